"""The HTTP contract of ``caig-ray serve`` (docs/serving.md): the request and response models, the one
error body every answer uses (``ErrorBody``), the statuses each operation documents, the serve limits
declared in the OpenAPI document, and the checks a request's product and images pass before anything is
scored (an image is decoded in full: a truncated PNG/JPEG is a 422, a limit is a 413 naming it).
``caig_ray/jobs/serve_rm.py`` serves it (FastAPI on Ray Serve)."""

# no `from __future__ import annotations` here: FastAPI resolves the request models from real annotations
import base64
import binascii
import io
import struct
import zlib
from typing import Annotated

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from caig_ray.config import ServeConfig
from caig_ray.data.catalog import to_8bit


def _utf8(value):
    """Text must be encodable: JSON can carry an unpaired surrogate escape that no tokenizer takes."""
    for text in ([value] if isinstance(value, str) else list(value or {}) + list((value or {}).values())):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text with an unpaired surrogate (not valid Unicode)") from None
    return value


class Product(BaseModel):
    title: str = Field(min_length=1, description="product title (at most serve.max_title_chars characters)")
    category: str | None = None
    attributes: dict[str, str] | None = Field(None, description="at most serve.max_attributes pairs")

    _valid_text = field_validator("title", "category", "attributes")(_utf8)


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where: e.g. ['body', 'product', 'title']")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error the API answers (and FastAPI's own validation errors) has this shape."""

    detail: list[ErrorItem]


ERRORS = {401: {"model": ErrorBody, "description": "no or a wrong API key (only with serve.api_key_env): send "
                                                  "'Authorization: Bearer <key>'",
                "headers": {"WWW-Authenticate": {"description": "Bearer", "required": True,
                                                 "schema": {"type": "string"}}}},
          413: {"model": ErrorBody, "description": "a field over a serve limit (the message names it and the "
                                                  "limit): the maxLength / maxProperties this document declares, "
                                                  "or an image over serve.max_image_bytes / max_image_side"},
          422: {"model": ErrorBody, "description": "invalid input (the location names the field): a body that is "
                                                  "not UTF-8 JSON, a missing or mistyped field, an image that is not "
                                                  "base64, not PNG/JPEG, or not complete"},
          503: {"model": ErrorBody, "description": "the replica is full: retry after the Retry-After seconds",
                "headers": {"Retry-After": {"description": "seconds", "required": True,
                                            "schema": {"type": "string"}}}}}
# Answered for paths and methods the document does not list (so they cannot sit under an operation):
# in components.responses, with the same body, and said in info.description.
OTHER_ANSWERS = {
    "NotFound": {"description": "404: no such path (the paths are the ones this document lists)",
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
    "MethodNotAllowed": {"description": "405: a method the path does not take (the Allow header lists those it "
                                        "does)",
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                         "headers": {"Allow": {"description": "the path's methods", "required": True,
                                               "schema": {"type": "string"}}}}}


def http_error(status: int, loc: list, msg: str, kind: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": msg, "type": kind}], headers=headers)


DOCUMENT_NOTE = (
    "Every error answer has the ErrorBody shape ({\"detail\": [{\"loc\", \"msg\", \"type\"}]}). Each operation "
    "lists its statuses; a body that is not UTF-8 JSON is its 422 (type json_invalid). A path this document does "
    "not list is 404 (components.responses.NotFound) and a method a path does not take 405 with an Allow header "
    "(MethodNotAllowed); with an API key configured, a request without it is 401 first. The limits are "
    "declared as maxLength / maxProperties: over one is 413. Outside this contract, from Ray Serve itself: a "
    "plain-text 503 while the deployment is unavailable and a plain-text 500 if a replica dies mid-request.")


def max_image_chars(max_image_bytes: int) -> int:
    """The longest base64 text that can decode to ``max_image_bytes`` bytes: a longer one is refused (413)
    before it is decoded; one within it still is when it decodes to more (by 1 or 2 bytes at most)."""
    return 4 * -(-max_image_bytes // 3)


def declare_limits(schema: dict, cfg: ServeConfig) -> None:
    """This replica's serve limits into the document, as the JSON Schema bounds they are (over one: 413)."""
    models = schema["components"]["schemas"]
    product = models["Product"]["properties"]
    product["title"]["maxLength"] = cfg.max_title_chars
    attrs = next(s for s in product["attributes"]["anyOf"] if s.get("type") == "object")
    attrs["maxProperties"] = cfg.max_attributes
    attrs["propertyNames"] = {"maxLength": cfg.max_attribute_chars}
    attrs["additionalProperties"]["maxLength"] = cfg.max_attribute_chars
    for image in (models["ScoreRequest"]["properties"]["image_a"], models["ScoreRequest"]["properties"]["image_b"],
                  models["RankRequest"]["properties"]["images"]["items"]):
        image["maxLength"] = max_image_chars(cfg.max_image_bytes)
        image["description"] = (image.get("description", "base64 PNG/JPEG of an ad") + f" (at most serve."
                                f"max_image_bytes = {cfg.max_image_bytes} bytes once decoded, sides at most serve."
                                f"max_image_side = {cfg.max_image_side} px: 413 over either)")


async def http_error_body(request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP error as ``ErrorBody``. Ours (``http_error``) already carry that detail; FastAPI's and
    Starlette's own carry a string, and get it here: the 400 FastAPI answers for a body it cannot
    parse (not UTF-8, nesting too deep) becomes the 422 of any other invalid JSON; 404 and 405 (its
    Allow header kept) name what was wrong without echoing the path back."""
    headers = dict(exc.headers or {})
    if isinstance(exc.detail, list):
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=headers)
    status = exc.status_code
    if status == 400:  # FastAPI: "There was an error parsing the body"
        status = 422
        item = {"loc": ["body"], "msg": "the body is not valid UTF-8 JSON" if isinstance(exc.__cause__, UnicodeDecodeError)
                else "the body could not be parsed as JSON", "type": "json_invalid"}
    elif status == 404:
        item = {"loc": ["path"], "msg": "no such path (the API's paths are listed in /openapi.json)", "type": "not_found"}
    elif status == 405:
        item = {"loc": ["method"], "msg": f"method not allowed on this path; allowed: {headers.get('Allow', '')}",
                "type": "method_not_allowed"}
    else:
        item = {"loc": [], "msg": str(exc.detail), "type": "http_error"}
    return JSONResponse(status_code=status, content={"detail": [item]}, headers=headers)


async def validation_error_body(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, as ``ErrorBody``: without the offending ``input`` echoed back (a 100k-character
    title, or text that cannot even be encoded as UTF-8, would otherwise come back or fail as a 500)."""
    items = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
             for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": items})


# base64 text (standard alphabet, no data: URI prefix) of a whole PNG or JPEG file
ImageB64 = Annotated[str, Field(min_length=1, json_schema_extra={"contentEncoding": "base64", "format": "byte"})]


class Health(BaseModel):
    status: str = Field(description="'ok'")
    model_path: str
    started_at: float = Field(description="when this replica started (Unix time)")
    requests_held: int = Field(description="requests this replica holds now")


class ScoreRequest(BaseModel):
    product: Product
    image_a: ImageB64 = Field(description="base64 PNG/JPEG of the first ad")
    image_b: ImageB64 = Field(description="base64 PNG/JPEG of the second ad")


class ScoreResponse(BaseModel):
    p_first_better: float
    p_first_better_debiased: float
    ctr_first: float
    ctr_second: float


class RankRequest(BaseModel):
    product: Product
    images: list[ImageB64] = Field(min_length=2, max_length=16, description="2-16 base64 PNG/JPEG ads")


class RankedImage(BaseModel):
    index: int
    win_rate: float  # mean debiased P(this beats the other) over all others
    ctr: float  # mean predicted CTR of this image over its pairs


class RankResponse(BaseModel):
    ranking: list[RankedImage]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png_problem(raw: bytes) -> str | None:
    """Why the PNG file ``raw`` is not whole, or None. Pillow decodes a PNG whose compressed pixel data
    ends early (a file cut after a few rows and closed again) without an error, the missing rows
    black; so here: every chunk complete with its CRC, IHDR first, the IDAT stream complete and
    holding exactly the bytes the header's size, depth, colour type and interlacing need, IEND present.
    Inflating to count costs one more pass over the pixel data, 64 KiB held at a time."""
    pos, header, expected, got = len(PNG_SIGNATURE), None, 0, 0
    stream = zlib.decompressobj()
    while True:
        if pos + 12 > len(raw):
            return "the file ends inside a chunk, before IEND"
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        end = pos + 12 + length
        if end > len(raw):
            return f"the file ends inside the {kind.decode('latin-1')!r} chunk"
        data = raw[pos + 8:end - 4]
        if zlib.crc32(kind + data) != struct.unpack(">I", raw[end - 4:end])[0]:
            return f"the {kind.decode('latin-1')!r} chunk fails its CRC"
        pos = end
        if header is None:
            if kind != b"IHDR" or length != 13:
                return "no IHDR chunk first"
            w, h, depth, colour, _, _, interlace = header = struct.unpack(">IIBBBBB", data)
            if colour not in _PNG_CHANNELS or interlace not in (0, 1):
                return "an invalid IHDR chunk"
            bits = _PNG_CHANNELS[colour] * depth
            passes = _ADAM7 if interlace else [(0, 0, 1, 1)]
            for x0, y0, dx, dy in passes:
                pw, ph = max(0, -(-(w - x0) // dx)), max(0, -(-(h - y0) // dy))
                if pw and ph:
                    expected += ph * (1 + (pw * bits + 7) // 8)  # each row: a filter byte and its pixels
        elif kind == b"IDAT":
            try:
                while not stream.eof and got <= expected:
                    out = stream.decompress(data, 1 << 16)
                    got, data = got + len(out), stream.unconsumed_tail
                    if not data and len(out) < 1 << 16:  # (a full buffer may leave output pending: go on)
                        break
            except zlib.error:
                return "its compressed pixel data is corrupt"
        elif kind == b"IEND":
            break
    if not stream.eof:
        return "its compressed pixel data is cut short"
    if got != expected:
        return (f"its pixel data holds {got} of the {expected} bytes its header needs" if got < expected else
                "its pixel data holds more bytes than its header needs")
    return None


def decode_image(value: str, field: str, max_bytes: int, max_side: int) -> Image.Image:
    """base64 -> RGB image, decoded in full; any failure is an HTTP 4xx naming ``field`` (and the limit,
    for a limit)."""
    loc = ["body", *field.replace("]", "").split("[")]
    loc = [int(x) if x.isdigit() else x for x in loc]
    if value[:5].lower() == "data:":
        raise http_error(422, loc, f"field '{field}': a data: URI; send only the base64 text after its "
                                   "'base64,' (no 'data:image/png;base64,' prefix)", "data_uri")
    if len(value) > max_image_chars(max_bytes):  # refused before decoding anything
        raise http_error(413, loc, f"field '{field}': base64 of {len(value)} characters is over the "
                                   f"{max_image_chars(max_bytes)} that serve.max_image_bytes ({max_bytes}) allows",
                         "too_large")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise http_error(422, loc, f"field '{field}': not valid base64", "base64") from None
    if len(raw) > max_bytes:
        raise http_error(413, loc, f"field '{field}': image of {len(raw)} bytes is over the serve.max_image_bytes "
                                   f"limit of {max_bytes}", "too_large")
    try:
        img = Image.open(io.BytesIO(raw))
        if img.format not in ("PNG", "JPEG"):
            raise http_error(422, loc, f"field '{field}': {img.format} image; send PNG or JPEG", "image_format")
        if max(img.size) > max_side:  # checked on the header, before any pixel is decoded
            raise http_error(413, loc, f"field '{field}': image side {max(img.size)} px is over the "
                                       f"serve.max_image_side limit of {max_side} px", "too_large")
        problem = png_problem(raw) if img.format == "PNG" else None
        if problem:
            raise http_error(422, loc, f"field '{field}': incomplete PNG: {problem}", "image_truncated")
        img.load()  # every pixel: a JPEG cut short raises here ("image file is truncated")
    except Image.DecompressionBombError:  # a header claiming a gigantic size, refused by Pillow before decoding
        raise http_error(413, loc, f"field '{field}': image size over the serve.max_image_side limit of {max_side} px",
                         "too_large") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as e:  # (UnidentifiedImageError is an OSError)
        if isinstance(e, OSError) and "truncated" in str(e) and not isinstance(e, UnidentifiedImageError):
            raise http_error(422, loc, f"field '{field}': incomplete image: the file is cut short",
                             "image_truncated") from None
        raise http_error(422, loc, f"field '{field}': not a PNG/JPEG image", "image") from None
    return to_8bit(img).convert("RGB")  # 16-bit grayscale scaled, not clipped to white


def check_product(product: Product, cfg: ServeConfig) -> None:
    """The serve limits on the product's text (413 naming the limit)."""
    if len(product.title) > cfg.max_title_chars:
        raise http_error(413, ["body", "product", "title"], f"title of {len(product.title)} characters is over "
                         f"the serve.max_title_chars limit of {cfg.max_title_chars}", "too_large")
    attrs = product.attributes or {}
    if len(attrs) > cfg.max_attributes:
        raise http_error(413, ["body", "product", "attributes"], f"{len(attrs)} attributes is over the "
                         f"serve.max_attributes limit of {cfg.max_attributes}", "too_large")
    for key, value in attrs.items():
        if max(len(key), len(value)) > cfg.max_attribute_chars:
            raise http_error(413, ["body", "product", "attributes", key], f"attribute {key[:40]!r} is over the "
                             f"serve.max_attribute_chars limit of {cfg.max_attribute_chars}", "too_large")
