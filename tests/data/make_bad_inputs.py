"""Writes the bad-input corpus (``tests/data/bad/``), one small file per class of input that real
data produces and that must be refused with file, row and field -- or, for valid-but-unusual input,
handled. Run it again after changing a case:  python tests/data/make_bad_inputs.py

catalogs (CAIG JSON): legacy_encoding.json (GBK caption), surrogate_title.json (unpaired surrogate
escape), huge_title.json (100k characters), empty.json, bomb.json (a PNG header claiming
100000 x 100000 px), transparent.json (alpha 0 everywhere), dir_image.json (a folder where the
image should be); unusual_images.json (16-bit grayscale, palette, CMYK JPEG, grayscale, an opaque
photo: all accepted). Click logs (parquet): no_rows.parquet, nan_counts.parquet,
float_counts.parquet (whole numbers stored as floats: accepted), no_pairs.parquet (no product with
two creatives).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

OUT = Path(__file__).parent / "bad"


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def product_png() -> Image.Image:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), (8, 8, 24, 24))
    return img


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG signature and IHDR claiming side x side pixels, with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def catalog(name: str, rows: list[dict] | str | bytes) -> None:
    path = OUT / name
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text(rows if isinstance(rows, str) else json.dumps(rows, ensure_ascii=False))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "images").mkdir(exist_ok=True)
    (OUT / "images" / "a_folder").mkdir(exist_ok=True)
    (OUT / "images" / "a_folder" / ".keep").write_text("")
    (OUT / "images" / "product.png").write_bytes(png(product_png()))
    (OUT / "images" / "bomb.png").write_bytes(bomb_png())
    (OUT / "images" / "transparent.png").write_bytes(png(Image.new("RGBA", (16, 16), (255, 0, 0, 0))))
    gray16 = Image.fromarray((np.linspace(0, 60000, 32 * 32).reshape(32, 32)).astype(np.uint16))
    (OUT / "images" / "gray16.png").write_bytes(png(gray16))
    (OUT / "images" / "palette.png").write_bytes(png(product_png().convert("RGB").convert("P")))
    (OUT / "images" / "cmyk.jpg").write_bytes(png(Image.new("CMYK", (32, 32), (0, 200, 200, 0)), "JPEG"))
    (OUT / "images" / "gray.png").write_bytes(png(Image.new("L", (32, 32), 90)))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 200, (32, 32, 3), dtype=np.uint8))
    (OUT / "images" / "photo.jpg").write_bytes(png(photo, "JPEG"))

    ok = {"id": "p0", "image": "images/product.png", "new_caption": "red sneakers"}
    catalog("legacy_encoding.json", '[{"id": "p0", "image": "images/product.png", "new_caption": "'.encode()
            + "红色运动鞋".encode("gbk") + b'"}]')
    catalog("surrogate_title.json", '[{"id": "p0", "image": "images/product.png", "new_caption": "shoe \\ud800"}]')
    catalog("huge_title.json", [{**ok, "new_caption": "sneaker " * 12_500}])
    catalog("empty.json", [])
    catalog("bomb.json", [ok, {**ok, "id": "p1", "image": "images/bomb.png"}])
    catalog("transparent.json", [{**ok, "image": "images/transparent.png"}])
    catalog("dir_image.json", [ok, {**ok, "id": "p1", "image": "images/a_folder"}])
    catalog("unusual_images.json", [{**ok, "id": f"p{i}", "image": f"images/{f}"} for i, f in enumerate(
        ["gray16.png", "palette.png", "cmyk.jpg", "gray.png", "photo.jpg"])] + [
        {**ok, "id": "p9", "new_caption": "红色运动鞋 / Кроссовки / حذاء رياضي"}])

    img = png(product_png().convert("RGB"))
    row = {"product_id": "p0", "creative_id": "c0", "image": img, "impressions": 2000, "clicks": 40}
    pq.write_table(pa.Table.from_pylist([row]).slice(0, 0), OUT / "no_rows.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "impressions": 2000.0, "clicks": float("nan")},
                                         {**row, "creative_id": "c1", "impressions": 1500.5, "clicks": 3.0}]),
                   OUT / "nan_counts.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "impressions": 2000.0, "clicks": 40.0},
                                         {**row, "creative_id": "c1", "impressions": 1800.0, "clicks": 35.0}]),
                   OUT / "float_counts.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "product_id": f"p{i}", "creative_id": f"c{i}"} for i in range(4)]),
                   OUT / "no_pairs.parquet")
    print(f"wrote {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
