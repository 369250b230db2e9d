"""Click logs: parquet with ``product_id, creative_id, image, impressions, clicks`` (+ optional
title, category, description). ``image`` is a path (relative to the file) or PNG/JPEG bytes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from caig_ray.data.catalog import DataError, decode_image

REQUIRED = ("product_id", "creative_id", "image", "impressions", "clicks")
MAX_REPORTED = 20


def read_click_logs(path: str | Path, check_images: bool = True, with_images: bool = True) -> pa.Table:
    """Read and validate a click log. Every bad row is reported (up to 20 listed, with the total);
    nothing is dropped: either the whole table is good or the read fails. ``with_images=False``
    leaves the image column out (a driver that only counts; ``check_images`` is then False too --
    ``caig_ray.dataplane.catalog.check_click_log_images`` checks them on the cluster)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"click log file not found: {path}")
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=None if with_images else [c for c in names if c != "image"])
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; required: {list(REQUIRED)}")
    if table.num_rows == 0:
        raise DataError(f"{path}: the click log has no rows")
    errors: list[str] = []
    for col in ("impressions", "clicks"):
        kind = table.schema.field(col).type
        if pa.types.is_floating(kind):  # counts stored as floats (a CSV export): whole numbers are fine
            values = table.column(col).to_pylist()
            bad = [i for i, v in enumerate(values) if v is not None and (v != v or v != int(v))]  # NaN or fractional
            errors += [f"{path}, row {i}, field '{col}': not a whole count ({values[i]})" for i in bad[:MAX_REPORTED]]
            if not bad:
                table = table.set_column(table.column_names.index(col), col, table.column(col).cast(pa.int64()))
        elif not pa.types.is_integer(kind):
            raise DataError(f"{path}, field '{col}': must be integer counts, got {kind}")
    if errors:
        raise DataError(f"{path}: {len(errors)} bad row(s) in the click log:\n  " + "\n  ".join(errors))
    cols = {c: table.column(c).to_pylist() for c in ("product_id", "creative_id", "impressions", "clicks")}
    seen: dict = {}
    for i in range(table.num_rows):
        imp, clk, cid = cols["impressions"][i], cols["clicks"][i], cols["creative_id"][i]
        where = f"{path}, row {i}"
        for col in ("product_id", "creative_id", "impressions", "clicks"):
            if cols[col][i] is None:
                errors.append(f"{where}, field '{col}': missing")
        if imp is not None and imp < 0:
            errors.append(f"{where}, field 'impressions': negative ({imp})")
        if clk is not None and clk < 0:
            errors.append(f"{where}, field 'clicks': negative ({clk})")
        if imp is not None and clk is not None and clk > imp:
            errors.append(f"{where}, field 'clicks': {clk} clicks > {imp} impressions")
        if cid is not None:
            if cid in seen:
                errors.append(f"{where}, field 'creative_id': duplicate {cid!r} (first at row {seen[cid]})")
            else:
                seen[cid] = i
    if check_images and with_images:
        images = table.column("image")
        for i in range(table.num_rows):
            try:
                decode_image(images[i].as_py(), path.parent, f"{path}, row {i}, field 'image'")
            except DataError as e:
                errors.append(str(e))
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED])
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise DataError(f"{path}: {len(errors)} bad row(s) in the click log:\n  {shown}{more}")
    return table


def load_log_image(table: pa.Table, row: int, base_dir: str | Path) -> Image.Image:
    """The ad image of one click-log row, as RGB."""
    value = table.column("image")[row].as_py()
    return decode_image(value, Path(base_dir), f"row {row}, field 'image'").convert("RGB")


def write_click_logs(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pair_images(pairs: pa.Table, path: str) -> pa.Table:
    """Ray Data map: each mined pair (``left_row``/``right_row`` of the click log) with its two ads (the
    log's ``image`` cells: bytes, or paths relative to the log) and its title, taken by row number from
    the log's parquet -- a block of pairs reads only its own rows."""
    import pyarrow.dataset as pads

    log = pads.dataset(path, format="parquet")
    cols = ["image"] + (["title"] if "title" in log.schema.names else [])
    left = log.take(pairs["left_row"], columns=cols)
    right = log.take(pairs["right_row"], columns=["image"])
    title = left["title"] if "title" in cols else pa.array([""] * pairs.num_rows)
    return (pairs.append_column("left_image", left["image"]).append_column("right_image", right["image"])
            .append_column("title", title))
