"""Catalog: CAIG's JSON format ``[{"id", "image", "new_caption"}]`` (+ optional "category",
"attributes") with RGBA PNGs -- RGB on white works too -- or parquet with the same columns
(``image`` a path relative to the file, or PNG/JPEG bytes)."""

from __future__ import annotations

import functools
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
from PIL import Image, UnidentifiedImageError

from caig_ray.errors import CaigError
from caig_ray.imaging import png_bytes, rgba_from_white_background


logger = logging.getLogger(__name__)
MAX_TITLE_CHARS = 2000  # a product title longer than this is refused (a 100k-character one stalls the PM)


class DataError(CaigError, ValueError):
    """Input data that cannot be used; the message names the file, the row and the field."""


def check_text(value: str, where: str, max_chars: int | None = None) -> str:
    """Text a tokenizer can take: valid Unicode (JSON can carry an unpaired surrogate escape) and, with
    ``max_chars``, not over that length."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: not valid Unicode text (an unpaired surrogate at character {e.start})") from None
    if max_chars is not None and len(value) > max_chars:
        raise DataError(f"{where}: {len(value)} characters, over the limit of {max_chars}")
    return value


@dataclass
class Product:
    id: str
    title: str
    image: Image.Image  # RGBA, transparent background
    category: str | None = None
    attributes: dict = field(default_factory=dict)


def image_roots(catalog: Path, image_root: str | Path | None = None) -> list[Path]:
    """Where a relative image path is looked up: ``--image-root`` if given, else the catalog's folder
    and then its parent (CAIG's ``tiny_dataset/tiny.json`` names ``tiny_dataset/images/...``)."""
    return [Path(image_root)] if image_root is not None else [catalog.parent, catalog.parent.parent]


def find_image(value: str, roots: list[Path], where: str) -> Path:
    """The file a catalog's image path names (absolute, or relative to the first of ``roots`` that has it)."""
    candidates = [Path(value)] if Path(value).is_absolute() else [r / value for r in roots]
    for path in candidates:
        if path.is_dir():
            raise DataError(f"{where}: {path} is a directory, not an image file")
        if path.is_file():
            return path
    rule = ("" if Path(value).is_absolute() else
            " (a relative path is looked up under --image-root if given, else the catalog's folder, then its "
            "parent; tried " + ", ".join(str(c) for c in candidates) + ")")
    raise DataError(f"{where}: image file not found: {value}{rule}")


def decode_image(value, base_dir: Path | list[Path], where: str) -> Image.Image:
    """Open an image given as a path (relative to ``base_dir``, or the first of a list of roots that
    has it) or as encoded bytes. ``where`` ("file, row N, field 'image'") is put in front of every error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: image is missing")
    if isinstance(value, (bytes, bytearray)):
        src, label = io.BytesIO(value), f"{len(value)} bytes"
    elif isinstance(value, str):
        path = find_image(value, base_dir if isinstance(base_dir, list) else [base_dir], where)
        src, label = path, str(path)
    else:
        raise DataError(f"{where}: expected a path or image bytes, got {type(value).__name__}")
    try:
        img = Image.open(src)
        img.load()
    except Image.DecompressionBombError as e:  # a header claiming a gigantic size: refused before decoding
        raise DataError(f"{where}: image too large to decode safely ({label}): {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot decode image ({label}): {e}") from None
    return to_8bit(img)


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (PNG "I;16", "I") scaled to 8-bit "L": Pillow's plain conversion
    clips them to white, which the white-background matting then turns fully transparent."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    return img


def _as_rgba(img: Image.Image, where: str) -> Image.Image:
    """The product with its alpha matte: its own alpha, or white background made transparent. A
    fully transparent product is refused; one with no background to remove (an opaque photo) is
    kept whole, with a warning: its product box is then the whole image."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
    else:
        rgba = rgba_from_white_background(img)
    alpha = np.asarray(rgba.getchannel("A"))
    if not alpha.any():
        raise DataError(f"{where}: the product image is fully transparent (no product pixels)")
    if alpha.min() == 255:
        logger.warning("%s: no alpha matte and no white background: the whole image is taken as the product", where)
    return rgba


def product_image(image_path: str | None, image_bytes: bytes | None, where: str = "product image") -> Image.Image:
    """The RGBA product of a validated catalog row (dataplane/catalog.py keeps a path or the bytes, not
    the pixels): decoded and matted where it is used."""
    return _as_rgba(decode_image(image_bytes if image_bytes is not None else image_path, [], where), where)


@dataclass
class ProductRecord:
    """What the online loop's driver keeps of a product: text and where its image is, never the pixels
    (docs/online-loop.md, the driver is the control plane: the driver is the control plane). ``image_ref``: see ``image_ref``."""

    id: str
    title: str
    category: str | None
    attributes: dict
    image_ref: str


_PART_ROW = re.compile(r"^(?P<part>.+\.parquet)#(?P<row>\d+)$")


def image_ref(image_path: str | None, part: str | Path, row: int) -> str:
    """Where a validated product's image is: its file (the catalog named one), or ``PART.parquet#ROW``
    -- row ``row`` of a validated-catalog part that carries the image's bytes."""
    return image_path if image_path else f"{part}#{row}"


@functools.lru_cache(maxsize=64)
def _part_row_starts(part: str) -> tuple[int, ...]:
    md = pq.ParquetFile(part).metadata
    return tuple(np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]).tolist())


@functools.lru_cache(maxsize=8)
def _part_group_images(part: str, group: int) -> list:
    """One row group's image bytes (a renderer batch mostly draws from one or two groups)."""
    return pq.ParquetFile(part).read_row_group(group, columns=["image_bytes"]).column(0).to_pylist()


def load_product_image(ref: str) -> Image.Image:
    """The RGBA product an ``image_ref`` points to, decoded and matted where it is used (a renderer, a
    policy rank), as ``read_catalog`` would have given it."""
    m = _PART_ROW.match(ref)
    if m is None:
        return product_image(ref, None, ref)
    row, starts = int(m["row"]), _part_row_starts(m["part"])
    group = int(np.searchsorted(starts, row, side="right")) - 1
    if not 0 <= row < starts[-1]:
        raise DataError(f"{ref}: row {row} is not in {m['part']} ({starts[-1]} rows)")
    return product_image(None, _part_group_images(m["part"], group)[row - starts[group]], ref)


def _rows_from_file(path: Path) -> list[dict]:
    if path.suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}, line {line}): a legacy encoding? re-save the "
                            "file as UTF-8") from None
        try:
            rows = json.loads(text)
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


def product_from_row(row, where: str, roots: list[Path]) -> Product:
    """One catalog row checked and turned into a ``Product`` (its image decoded and matted); a bad row
    raises ``DataError`` naming ``where`` (file and row) and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for key in ("id", "image", "new_caption"):
        if row.get(key) is None:
            raise DataError(f"{where}, field '{key}': missing")
    if not isinstance(row["new_caption"], str) or not row["new_caption"].strip():
        raise DataError(f"{where}, field 'new_caption': must be a non-empty string")
    check_text(row["new_caption"], f"{where}, field 'new_caption'", MAX_TITLE_CHARS)
    check_text(str(row["id"]), f"{where}, field 'id'", MAX_TITLE_CHARS)
    attrs = row.get("attributes") or {}
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except json.JSONDecodeError:
            raise DataError(f"{where}, field 'attributes': not a JSON object") from None
    if not isinstance(attrs, dict):
        raise DataError(f"{where}, field 'attributes': must be an object, got {type(attrs).__name__}")
    for k, v in attrs.items():
        check_text(f"{k}{v}", f"{where}, field 'attributes' ({str(k)[:40]!r})", MAX_TITLE_CHARS)
    image_where = f"{where}, field 'image'"
    image = _as_rgba(decode_image(row["image"], roots, image_where), image_where)
    category = row.get("category")
    return Product(str(row["id"]), row["new_caption"], image, None if category is None else str(category), attrs)


def read_catalog(path: str | Path, image_root: str | Path | None = None) -> list[Product]:
    """Read and validate every product into memory (worlds and tests; ``generate`` streams instead:
    dataplane/catalog.py); the first bad row stops the read with its location."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"catalog file not found: {path}")
    rows = _rows_from_file(path)
    if not rows:
        raise DataError(f"{path}: the catalog has no products")
    roots = image_roots(path, image_root)
    products, seen = [], {}
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        product = product_from_row(row, where, roots)
        if product.id in seen:
            raise DataError(f"{where}, field 'id': duplicate id {product.id!r} (first at row {seen[product.id]})")
        seen[product.id] = i
        products.append(product)
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
