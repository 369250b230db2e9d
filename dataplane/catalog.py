"""The catalog as a Ray Dataset: read lazily by read tasks, validated by Ray Data in parallel.

    CatalogSource (read tasks: CAIG JSON, parquet row groups, or a folder of images)
        --> map_batches(validate_rows)  writes valid/ and rejects/ parquet parts, returns counts
    driver: counts and the first few messages only -- never a row, never an image.

A row is kept as a reference to its image (a path, or the bytes the catalog carried): the image is
decoded here to validate it and again where it is used (policy actors, renderers), so the valid
catalog of a million products is a few tens of MB of parquet, not the images. Every bad row goes to
``rejects/`` with its row number, field and reason and the row itself: nothing vanishes.
``validate_catalog`` then stops the job (``on_bad_rows="stop"``, the default) or goes on without
them (``"reject"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from caig_ray.data.catalog import DataError, ProductRecord, find_image, image_ref, image_roots, product_from_row
from caig_ray.rows import CATALOG_ROW_SCHEMA
from caig_ray.storage import write_part

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
RAW_SCHEMA = pa.schema([("row", pa.int64()), ("raw", pa.string()), ("image_bytes", pa.binary())])
REJECT_SCHEMA = pa.schema([("row", pa.int64()), ("error", pa.string()), ("raw", pa.string()),
                           ("image_bytes", pa.binary())])


def _raw_table(first_row: int, rows: list) -> pa.Table:
    """Rows as (row number, the row as JSON text, image bytes if it carried them): a uniform schema
    whatever types a bad row holds, so that reading never fails on a row validation should name."""
    raw, data = [], []
    for r in rows:
        image = r.get("image") if isinstance(r, dict) else None
        if isinstance(image, (bytes, bytearray)):
            r = {**r, "image": None}
            data.append(bytes(image))
        else:
            data.append(None)
        raw.append(json.dumps(r, ensure_ascii=False, default=str))
    return pa.Table.from_arrays([pa.array(range(first_row, first_row + len(rows)), pa.int64()),
                                 pa.array(raw, pa.string()), pa.array(data, pa.binary())], schema=RAW_SCHEMA)


class CatalogSource(Datasource):
    """CAIG's JSON list (one read task parses it; its rows leave in blocks), parquet (a read task per
    row group, row numbers from the file's metadata) or a folder of images (id = file stem, title =
    ``<stem>.txt`` beside it if there is one, else the stem with ``_`` as spaces)."""

    def __init__(self, path: Path, rows_per_block: int = 2000):
        super().__init__()
        self.path, self.rows_per_block = path, rows_per_block

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        path, step = self.path, self.rows_per_block
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[str(path)], exec_stats=None)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            return [ReadTask(lambda chunk=files[i:i + step], i=i: [_raw_table(i, [_folder_row(f) for f in chunk])], meta)
                    for i in range(0, len(files), step)]
        if path.suffix == ".parquet":
            md = pq.ParquetFile(path).metadata
            starts = [sum(md.row_group(k).num_rows for k in range(g)) for g in range(md.num_row_groups)]
            return [ReadTask(lambda g=g, s=s: _parquet_group(path, g, s, step), meta) for g, s in enumerate(starts)]
        return [ReadTask(lambda: _json_blocks(path, step), meta)]


def _folder_row(image: Path) -> dict:
    sidecar = image.with_suffix(".txt")
    title = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else image.stem.replace("_", " ")
    return {"id": image.stem, "image": str(image), "new_caption": title}


def _parquet_group(path: Path, group: int, first_row: int, step: int):
    try:
        rows = pq.ParquetFile(path).read_row_group(group).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        yield _file_error(DataError(f"{path}: row group {group} is not readable parquet: {e}"))
        return
    for i in range(0, len(rows), step):
        yield _raw_table(first_row + i, rows[i:i + step])


def _file_error(error: DataError) -> pa.Table:
    """A file-level error (not UTF-8, not JSON, ...) as row -1: it reaches the driver as data, with
    its message intact, instead of as a task failure wrapped in Ray's traceback."""
    return pa.Table.from_pylist([{"row": -1, "raw": str(error), "image_bytes": None}], RAW_SCHEMA)


def _json_blocks(path: Path, step: int):
    from caig_ray.data.catalog import _rows_from_file  # the same encoding/JSON checks as read_catalog

    try:
        rows = _rows_from_file(path)
    except DataError as e:
        yield _file_error(e)
        return
    for i in range(0, len(rows), step):
        yield _raw_table(i, rows[i:i + step])


def validate_rows(batch: pa.Table, source: str, roots: list[str], out: str, rows_per_group: int) -> pa.Table:
    """Ray Data map: check each row (``product_from_row``), write the batch's valid rows and rejects as
    parquet parts named by its first row (a retried task rewrites the same part), return counts."""
    valid, rejects, dirs = [], [], [Path(p) for p in roots]
    if batch["row"][0].as_py() == -1:
        return pa.table({"first_row": [-1], "rows": [0], "valid": [0], "rejected": [0],
                         "errors": [[batch["raw"][0].as_py()]]})
    for r in batch.to_pylist():
        where = f"{source}, row {r['row']}"
        try:
            row = json.loads(r["raw"])
            if isinstance(row, dict) and r["image_bytes"] is not None:
                row["image"] = r["image_bytes"]
            elif isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"].strip():
                # looked up once, here: the valid catalog keeps the absolute path its users open
                row["image"] = str(find_image(row["image"], dirs, f"{where}, field 'image'").resolve())
            product = product_from_row(row, where, dirs)
        except DataError as e:
            rejects.append({"row": r["row"], "error": str(e), "raw": r["raw"], "image_bytes": r["image_bytes"]})
            continue
        image = row["image"]
        valid.append({"row": r["row"], "id": product.id, "title": product.title, "category": product.category,
                      "attributes": json.dumps(product.attributes, ensure_ascii=False),
                      "image_path": None if isinstance(image, bytes) else image,
                      "image_bytes": image if isinstance(image, bytes) else None})
    first = batch["row"][0].as_py()
    if valid:
        write_part(pa.Table.from_pylist(valid, CATALOG_ROW_SCHEMA), Path(out) / "valid", f"part-{first:012d}.parquet",
                    rows_per_group)
    if rejects:
        write_part(pa.Table.from_pylist(rejects, REJECT_SCHEMA), Path(out) / "rejects", f"part-{first:012d}.parquet")
    return pa.table({"first_row": [first], "rows": [batch.num_rows], "valid": [len(valid)],
                     "rejected": [len(rejects)], "errors": [[x["error"] for x in rejects[:3]]]})


@dataclass
class CatalogCheck:
    """What ``validate_catalog`` found; ``valid`` is a folder of parquet parts (``read_parquet`` it)."""

    rows: int
    valid_rows: int
    rejected_rows: int
    valid: Path
    rejects: Path
    first_errors: list[str]


def validate_catalog(catalog: str | Path, out: str | Path, on_bad_rows: str = "stop",
                     image_root: str | Path | None = None, rows_per_group: int = 64) -> CatalogCheck:
    """Read and validate ``catalog`` on the Ray cluster (workers read, decode and write; the driver gets
    counts). Bad rows: ``"stop"`` raises a ``DataError`` with the count and the first rows, before
    anything else runs; ``"reject"`` logs them and goes on. Both leave every bad row in ``rejects/``.
    Duplicate ids always stop (one result per id is written, and resume goes by id). The valid rows
    are written in row groups of ``rows_per_group``: ``ValidCatalogSource``'s blocks."""
    if on_bad_rows not in ("stop", "reject"):
        raise ValueError(f"on_bad_rows must be 'stop' or 'reject', got {on_bad_rows!r}")
    path, out = Path(catalog), Path(out)
    if not path.exists():
        raise DataError(f"catalog not found: {path}")
    if not path.is_dir() and path.suffix not in (".json", ".parquet"):
        raise DataError(f"{path}: unknown catalog format {path.suffix!r} (use .json, .parquet or a folder of images)")
    for old in ("valid", "rejects"):  # a rerun validates afresh
        for part in (out / old).glob("*.parquet") if (out / old).is_dir() else []:
            part.unlink()
    roots = [str(r) for r in image_roots(path, image_root)]
    source = CatalogSource(path)
    # one output block per read task: the read tasks already cut the catalog into blocks of
    # rows_per_block; Ray Data's default would split them further towards 200 blocks (a 40-row
    # catalog into 40 one-row validation tasks, each a task worker to start)
    ds = ray.data.read_datasource(source, num_cpus=0.5, override_num_blocks=len(source.get_read_tasks(1)))
    ds = ds.map_batches(validate_rows, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                        fn_kwargs={"source": str(path), "roots": roots, "out": str(out),
                                   "rows_per_group": rows_per_group})
    rows = valid = rejected = 0
    errors: list[tuple[int, str]] = []
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in b.to_pylist():
            if r["first_row"] == -1:
                raise DataError(r["errors"][0])
            rows, valid, rejected = rows + r["rows"], valid + r["valid"], rejected + r["rejected"]
            errors.extend((r["first_row"], e) for e in r["errors"])
    first_errors = [e for _, e in sorted(errors)[:5]]
    check = CatalogCheck(rows, valid, rejected, out / "valid", out / "rejects", first_errors)
    if rows == 0:
        raise DataError(f"{path}: the catalog has no products")
    if rejected:
        msg = (f"{path}: {rejected} bad row(s) of {rows} (every one, with its reason, in {check.rejects}); first: "
               + "; ".join(first_errors))
        if on_bad_rows == "stop":
            raise DataError(msg + " -- fix them, or pass --on-bad-rows reject to go on without them")
        logger.warning("%s -- going on without them (--on-bad-rows reject)", msg)
    if valid:
        _refuse_duplicate_ids(path, check.valid)
    else:
        raise DataError(f"{path}: none of its {rows} rows is usable (reasons in {check.rejects})")
    return check


def catalog_records(valid: Path) -> list[ProductRecord]:
    """The valid catalog as the online loop's driver keeps it: every column but the image bytes, and
    an ``image_ref`` for each product (its path, or its row of a valid part) -- tens of bytes a
    product, ordered as the catalog is."""
    records = []
    for part in sorted(Path(valid).glob("*.parquet")):
        table = pq.read_table(part, columns=["row", "id", "title", "category", "attributes", "image_path"])
        for i, r in enumerate(table.to_pylist()):
            records.append(ProductRecord(r["id"], r["title"], r["category"], json.loads(r["attributes"] or "{}"),
                                         image_ref(r["image_path"], part.resolve(), i)))
    return records


class ValidCatalogSource(Datasource):
    """The valid rows ``validate_catalog`` wrote, one block per row group: a Ray Data map turns a block
    into one output block, so the row group is the pipeline's unit of streaming (a whole 2,000-row
    part as one block would keep the renderers waiting for its last description). Products whose
    id is in ``skip`` (an object reference to an Arrow array: those already written) are left out."""

    def __init__(self, valid: Path, skip=None):
        super().__init__()
        self.valid, self.skip = valid, skip

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        skip, tasks = self.skip, []
        for part in sorted(self.valid.glob("*.parquet")):
            md = pq.ParquetFile(part).metadata
            for g in range(md.num_row_groups):
                meta = BlockMetadata(num_rows=md.row_group(g).num_rows, size_bytes=None, input_files=[str(part)],
                                     exec_stats=None)
                tasks.append(ReadTask(lambda part=part, g=g: [_row_group(part, g, skip)], meta))
        return tasks


def _row_group(part: Path, group: int, skip) -> pa.Table:
    import pyarrow.compute as pc

    table = pq.ParquetFile(part).read_row_group(group)
    if skip is not None:
        table = table.filter(pc.invert(pc.is_in(table["id"], value_set=ray.get(skip))))
    return table


@ray.remote(num_cpus=0.5)
def _duplicate_ids(valid: str) -> list[tuple[str, int]]:
    """Ids that occur more than once (at most 5), counted by Arrow over the id column alone, in a task:
    a million ids never enter the driver (a Ray Data groupby costs ~16 s of shuffle setup even for 6 rows)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    counts = pc.value_counts(pads.dataset(valid, format="parquet").to_table(columns=["id"])["id"])
    dups = counts.filter(pc.greater(pc.struct_field(counts, "counts"), 1))[:5]
    return [(d["values"], d["counts"]) for d in dups.to_pylist()]


def _refuse_duplicate_ids(path: Path, valid: Path) -> None:
    dups = ray.get(_duplicate_ids.remote(str(valid)))
    if dups:
        listed = ", ".join(f"{i!r} ({n} rows)" for i, n in dups)
        raise DataError(f"{path}, field 'id': duplicate id(s) {listed}: every product needs its own id")


def _check_log_images(batch: pa.Table, path: str) -> pa.Table:
    """Ray Data map: decode the images of click-log rows [start, end) of ``path``; (row, error) of each bad one."""
    import pyarrow.dataset as pads

    from caig_ray.data.catalog import decode_image

    rows, errors = [], []
    for start, end in zip(batch["start"].to_pylist(), batch["end"].to_pylist()):
        images = pads.dataset(path, format="parquet").take(pa.array(range(start, end)), columns=["image"])["image"]
        for i, value in enumerate(images.to_pylist()):
            try:
                decode_image(value, Path(path).parent, f"{path}, row {start + i}, field 'image'")
            except DataError as e:
                rows.append(start + i)
                errors.append(str(e))
    return pa.table({"row": pa.array(rows, pa.int64()), "error": pa.array(errors, pa.string())})


def check_click_log_images(path: str | Path, rows_per_task: int = 2000) -> None:
    """Decode every ad image of a click log on the cluster (Ray Data, ``rows_per_task`` rows a task)
    instead of one by one in the driver; every bad row is reported (20 listed, with the total)."""
    from caig_ray.data.clicklogs import MAX_REPORTED

    path = Path(path)
    n = pq.ParquetFile(path).metadata.num_rows
    spans = [{"start": s, "end": min(n, s + rows_per_task)} for s in range(0, n, rows_per_task)]
    ds = ray.data.from_items(spans, override_num_blocks=max(1, len(spans)))
    ds = ds.map_batches(_check_log_images, fn_kwargs={"path": str(path)}, batch_format="pyarrow", batch_size=1,
                        num_cpus=0.5)
    bad = sorted((r["row"], r["error"]) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                 for r in b.to_pylist())
    if bad:
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{path}: {len(bad)} bad row(s) in the click log:\n  "
                        + "\n  ".join(e for _, e in bad[:MAX_REPORTED]) + more)


def safe_name(product_id: str) -> str:
    """A file name for a product id (ids may hold '/', spaces, any script): kept when it is plain,
    else its plain characters + a short hash, so two ids never share a name."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", product_id)[:80]
    if plain == product_id:
        return plain
    return f"{plain}-{hashlib.sha1(product_id.encode()).hexdigest()[:10]}"
