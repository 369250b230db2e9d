"""Where a job's outputs live: ``storage`` (config) / ``--storage`` (flag). docs/online-loop.md, storage.

- unset: ``--out`` is a folder on this machine, as on a laptop.
- a POSIX path -- a shared volume (NFS/EFS/Filestore PVC) mounted at the same path on every pod: a
  relative ``--out`` is a folder under it, and every rank writes there directly.
- an object-store URI -- anything ``pyarrow.fs.FileSystem.from_uri`` reads (``s3://bucket/prefix``,
  ``gs://...``; ``?endpoint_override=...&scheme=http`` for an S3-compatible server; credentials from
  the usual environment variables): the job writes to a local staging folder and uploads it -- at
  every checkpoint and at the end -- as Ray Train does with its ``storage_path``. ``--resume``
  downloads from there, so a RayJob retried on fresh pods continues.

``--out`` outside ``storage`` is refused: every output of a job lands under the one storage.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from caig_ray.config import ConfigError


def is_uri(location: str) -> bool:
    return "://" in location


def _split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/p?x=1`` -> (``s3://b/p``, ``?x=1``)."""
    base, q, query = uri.partition("?")
    return base.rstrip("/"), (q + query) if q else ""


def staging_root() -> Path:
    """Local folder object-store outputs are staged in (``CAIG_STAGING_DIR``, default under the temp dir)."""
    return Path(os.environ.get("CAIG_STAGING_DIR") or Path(tempfile.gettempdir()) / "caig-staging")


@dataclass(frozen=True)
class Output:
    """One output (a folder, or a single file) of a job: ``local`` is where the job writes; ``uri``
    (object store only) is where it is uploaded to and downloaded from."""

    local: Path
    uri: str | None = None

    @property
    def staged(self) -> bool:
        return self.uri is not None

    def __str__(self) -> str:
        return self.uri or str(self.local)

    def child(self, sub: str) -> "Output":
        if not self.staged:
            return Output(self.local / sub)
        base, query = _split_uri(self.uri)
        return Output(self.local / sub, f"{base}/{sub}{query}")

    def sibling(self, name: str) -> "Output":
        """``<out>_<name>`` next to this output (Ray Train's storage, TensorBoard of rank 0)."""
        if not self.staged:
            return Output(self.local.with_name(f"{self.local.name}_{name}"))
        base, query = _split_uri(self.uri)
        return Output(self.local.with_name(f"{self.local.name}_{name}"), f"{base}_{name}{query}")

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) of the stored copy: the object store, or the local disk."""
        if not self.staged:
            return pafs.LocalFileSystem(), str(self.local)
        return pafs.FileSystem.from_uri(self.uri)

    def exists(self) -> bool:
        fs, path = self.filesystem()
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def upload(self, exclude: tuple[str, ...] = ()) -> None:
        """Copy the local copy to the object store (a no-op when ``local`` is the storage itself);
        top-level entries named in ``exclude`` stay local."""
        if not self.staged or not self.local.exists():
            return
        fs, path = self.filesystem()
        if self.local.is_file():
            pafs.copy_files(str(self.local), path, destination_filesystem=fs)
            return
        fs.create_dir(path, recursive=True)
        for entry in sorted(self.local.iterdir()):
            if entry.name not in exclude:
                pafs.copy_files(str(entry), f"{path}/{entry.name}", destination_filesystem=fs)

    def download(self, exclude: tuple[str, ...] = ()) -> bool:
        """Copy the stored copy into ``local`` (top-level entries in ``exclude`` skipped); False when
        storage holds nothing there."""
        if not self.staged:
            return self.local.exists()
        fs, path = self.filesystem()
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        if info.type == pafs.FileType.File:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(self.local), source_filesystem=fs)
            return True
        self.local.mkdir(parents=True, exist_ok=True)
        for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            rel = PurePosixPath(entry.path).relative_to(PurePosixPath(path))
            if entry.type != pafs.FileType.File or rel.parts[0] in exclude:
                continue
            target = self.local / rel  # copy_files does not create local parent folders: make them
            target.parent.mkdir(parents=True, exist_ok=True)
            # written beside, then renamed: two downloads into one folder (ranks of one host) never
            # leave a half-written file
            part = target.with_name(f"{target.name}.part-{os.getpid()}")
            pafs.copy_files(entry.path, str(part), source_filesystem=fs)
            os.replace(part, target)
        return True

    def listdir(self) -> list[str]:
        """Names of the stored copy's entries (empty when it does not exist)."""
        fs, path = self.filesystem()
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return sorted(PurePosixPath(e.path).name for e in fs.get_file_info(pafs.FileSelector(path)))

    def delete(self) -> None:
        """Remove the stored copy (the object-store one; the local one is the caller's)."""
        if self.staged and self.exists():
            fs, path = self.filesystem()
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)
            else:
                fs.delete_dir(path)


def resolve_output(storage: str | None, out: str | Path, flag: str = "--out") -> Output:
    """Where ``out`` lives under ``storage`` (see the module docstring); refuses an ``out`` outside it."""
    out = str(out)
    if not storage:
        if is_uri(out):
            raise ConfigError(f"{flag} {out} is an object-store URI: give the store as --storage (or the config's "
                              f"storage) and {flag} as a path under it")
        return Output(Path(out).resolve())
    if is_uri(storage):
        base, query = _split_uri(storage)
        try:
            pafs.FileSystem.from_uri(storage)
        except (ValueError, OSError) as e:  # pyarrow says ArrowInvalid (a ValueError) for a bad URI
            raise ConfigError(f"storage {storage!r} is not a URI pyarrow.fs can open: {e}") from None
        if is_uri(out):
            if not _split_uri(out)[0].startswith(base + "/"):
                raise ConfigError(f"{flag} {out} is outside storage {storage}")
            rel = _split_uri(out)[0][len(base) + 1:]
        elif Path(out).is_absolute():
            raise ConfigError(f"{flag} {out} is a local path but storage is {storage}: give {flag} relative "
                              "to the storage")
        else:
            rel = out
        rel = str(PurePosixPath(rel))
        if rel.startswith("..") or not rel or rel == ".":
            raise ConfigError(f"{flag} {out} is not a folder under storage {storage}")
        digest = hashlib.sha1(base.encode()).hexdigest()[:12]
        return Output(staging_root() / digest / rel, f"{base}/{rel}{query}")
    root = Path(storage).resolve()
    path = (root / out).resolve() if not Path(out).is_absolute() else Path(out).resolve()
    if path != root and root not in path.parents:
        raise ConfigError(f"{flag} {out} is outside storage {storage}: every output of a job lands under it")
    return Output(path)


class OutputInUse(ConfigError):
    """An ``--out`` that already holds something the job would replace or mix with."""


def is_used(out: Output) -> bool:
    """Whether ``out`` holds anything: a file or a non-empty folder; for an object-store output, its
    stored copy (the local staging folder is a cache of it, not an output)."""
    if out.staged:
        return out.exists()
    local = out.local
    return local.is_file() or (local.is_dir() and any(local.iterdir()))


def refuse_used(out: Output, remedy: str, flag: str = "--out") -> None:
    """Refuse a used output before anything runs: no job replaces what the user did not ask it to."""
    if is_used(out):
        raise OutputInUse(f"{flag} {out} already exists and is not empty: {remedy}")


def new_run_id() -> str:
    """A run's id: UTC start time and a random suffix (sorts by start; unique across pods)."""
    import secrets
    import time

    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# --- models read from storage -------------------------------------------------------------------

MANIFEST = ".caig-model.json"


def model_location(value: str | Path | None, storage: str | None = None) -> str | None:
    """A model input (``--policy``, ``--rm``, a config's model path) as every process can read it: a
    local folder made absolute, or an object-store URI kept as given -- one under an object-store
    ``storage`` that carries no query (``s3://bucket/caig/pm``) takes the storage's
    (``?endpoint_override=...``), so the same URI a job printed as its output is accepted as input."""
    if value is None:
        return None
    value = str(value)
    if not is_uri(value):
        return str(Path(value).resolve())
    if storage and is_uri(storage) and "?" not in value:
        base, query = _split_uri(storage)
        if query and (value.rstrip("/") == base or value.startswith(base + "/")):
            return value.rstrip("/") + query
    return value


def model_cache_root() -> Path:
    """This node's cache of models read from an object store (``CAIG_MODEL_CACHE``, default under the
    temp dir): each URI is downloaded once per node and shared by every process on it."""
    return Path(os.environ.get("CAIG_MODEL_CACHE") or Path(tempfile.gettempdir()) / "caig-model-cache")


def _listing(fs: pafs.FileSystem, path: str) -> dict[str, list]:
    """{relative path: [size, modification time in ns]} of every file of a stored model folder: a model
    written again at the same URI (same names, same sizes) still reads as changed."""
    files = {}
    for e in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if e.type == pafs.FileType.File:
            files[str(PurePosixPath(e.path).relative_to(PurePosixPath(path)))] = [e.size, e.mtime_ns]
    return files


def local_model(location: str | Path) -> Path:
    """The local folder holding the model at ``location``: the folder itself, or -- for an object-store
    URI -- this node's cached copy, downloaded once (under a lock, so the processes of one node that ask
    together download it once), checked file by file against the store's sizes, and downloaded again
    when the stored model changed. Then ``from_pretrained`` loads it as any folder."""
    import fcntl
    import json
    import shutil

    location = str(location)
    if not is_uri(location):
        return Path(location)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
        info = fs.get_file_info(path)
    except (ValueError, OSError) as e:  # pyarrow says ArrowInvalid (a ValueError) for a URI it cannot open
        raise ConfigError(f"model {location}: not a location pyarrow.fs can read: {e}") from None
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"model {location}: no such folder in the object store")
    want = _listing(fs, path)
    root = model_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(_split_uri(location)[0].encode()).hexdigest()[:16]
    folder = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = folder / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()).get("files") == want:
            return folder
        tmp = root / f"{key}.part-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own half-written copy, never a user's
        for rel in want:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{path}/{rel}", str(target), source_filesystem=fs)
        got = {rel: (tmp / rel).stat().st_size for rel in want}
        if got != {rel: size for rel, (size, _) in want.items()}:
            bad = sorted(r for r in want if got.get(r) != want[r][0])
            raise ConfigError(f"model {location}: downloaded files differ from the store's: {', '.join(bad[:5])}")
        (tmp / MANIFEST).write_text(json.dumps({"uri": _split_uri(location)[0], "files": want}))
        if folder.exists():
            old = root / f"{key}.old-{os.getpid()}"
            folder.rename(old)  # a stale copy of this cache entry (the stored model changed)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(folder)
    return folder


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all: written beside, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def part_name(ids) -> str:
    """A parquet part's file name from the ids of the rows it holds, in the order given: a retried
    batch (same rows) writes the same part again instead of a second copy."""
    return "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"


def write_part(table, folder: str | Path, name: str, row_group_size: int | None = None,
               filesystem: pafs.FileSystem | None = None) -> None:
    """A parquet part, whole or not at all: written under a hidden temporary name in ``folder`` and
    renamed (over an earlier copy of the same part). ``filesystem``: where ``folder`` is (default:
    this machine's disk; an object store's ``Output.filesystem()`` for the online loop's ads)."""
    import pyarrow.parquet as pq

    fs, folder = filesystem or pafs.LocalFileSystem(), str(folder)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.tmp"
    with fs.open_output_stream(tmp) as stream:
        pq.write_table(table, stream, row_group_size=row_group_size)
    fs.move(tmp, f"{folder}/{name}")
