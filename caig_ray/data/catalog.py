"""Catalog: CAIG's JSON format ``[{"id", "image", "new_caption"}]`` (+ optional "category",
"attributes") with RGBA PNGs -- RGB on white works too -- or parquet with the same columns
(``image`` a path relative to the file, or PNG/JPEG bytes)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from caig_ray.imaging import png_bytes, rgba_from_white_background


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the row and the field."""


@dataclass
class Product:
    id: str
    title: str
    image: Image.Image  # RGBA, transparent background
    category: str | None = None
    attributes: dict = field(default_factory=dict)


def decode_image(value, base_dir: Path, where: str) -> Image.Image:
    """Open an image given as a path (relative to ``base_dir``) or as encoded bytes.
    ``where`` ("file, row N, field 'image'") is put in front of every error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: image is missing")
    if isinstance(value, (bytes, bytearray)):
        src, label = io.BytesIO(value), f"{len(value)} bytes"
    elif isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise DataError(f"{where}: image file not found: {path}")
        src, label = path, str(path)
    else:
        raise DataError(f"{where}: expected a path or image bytes, got {type(value).__name__}")
    try:
        img = Image.open(src)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{where}: cannot decode image ({label}): {e}") from None
    return img


def _as_rgba(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA")
    return rgba_from_white_background(img)


def _rows_from_file(path: Path) -> list[dict]:
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of products, got {type(rows).__name__}")
        return rows
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from None
    raise DataError(f"{path}: unknown catalog format {path.suffix!r} (use .json or .parquet)")


def read_catalog(path: str | Path) -> list[Product]:
    """Read and validate every product; the first bad row stops the read with its location."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"catalog file not found: {path}")
    rows = _rows_from_file(path)
    products, seen = [], {}
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        for key in ("id", "image", "new_caption"):
            if row.get(key) is None:
                raise DataError(f"{where}, field '{key}': missing")
        pid = str(row["id"])
        if pid in seen:
            raise DataError(f"{where}, field 'id': duplicate id {pid!r} (first at row {seen[pid]})")
        seen[pid] = i
        if not isinstance(row["new_caption"], str) or not row["new_caption"].strip():
            raise DataError(f"{where}, field 'new_caption': must be a non-empty string")
        attrs = row.get("attributes") or {}
        if isinstance(attrs, str):
            try:
                attrs = json.loads(attrs)
            except json.JSONDecodeError:
                raise DataError(f"{where}, field 'attributes': not a JSON object") from None
        if not isinstance(attrs, dict):
            raise DataError(f"{where}, field 'attributes': must be an object, got {type(attrs).__name__}")
        image = _as_rgba(decode_image(row["image"], path.parent, f"{where}, field 'image'"))
        products.append(Product(pid, row["new_caption"], image, row.get("category"), attrs))
    return products


def write_catalog(products: list[Product], path: str | Path) -> Path:
    """Write CAIG's JSON (images as PNGs in ``images/`` beside it) or parquet (PNG bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([
            {"id": p.id, "image": png_bytes(p.image), "new_caption": p.title, "category": p.category,
             "attributes": json.dumps(p.attributes)} for p in products
        ]), path)
        return path
    img_dir = path.parent / "images"
    img_dir.mkdir(exist_ok=True)
    rows = []
    for p in products:
        p.image.save(img_dir / f"{p.id}.png")
        rows.append({"id": p.id, "image": f"images/{p.id}.png", "new_caption": p.title,
                     "category": p.category, "attributes": p.attributes})
    path.write_text(json.dumps(rows, indent=1))
    return path
