"""Decoding user-supplied images safely: format, size limit before decoding, orientation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serve_app.protocol.errors import RequestError
from serve_app.services.validation import check_upload_pixels

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """Base64 PNG/JPEG/WebP (optionally a data: URL) to an RGB image, or a RequestError naming `field`.

    The pixel count is read from the header and checked before the pixels are decoded, so a
    decompression bomb is refused without allocating it.
    """
    return load_image(open_image(data, field, max_pixels), field, max_pixels)


def _allowed(max_pixels: int) -> str:
    return f"base64 {', '.join(ALLOWED_FORMATS)}, at most {max_pixels} pixels"


def open_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """`decode_image`'s first half: the upload opened and its header checked (format, at most
    `max_pixels`), its pixels not decoded yet, so a caller can size several uploads up first."""
    allowed = _allowed(max_pixels)
    raw = upload_bytes(data, field, allowed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(field, "declares more pixels than allowed", allowed) from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(field, "is not a readable PNG or JPEG or WebP image", allowed) from None
    if image.format not in ALLOWED_FORMATS:
        raise RequestError(field, f"format {image.format} is not supported", allowed)
    check_upload_pixels(field, image.size, max_pixels, allowed)
    return image


# How each EXIF orientation is undone (what ImageOps.exif_transpose does, applied here after
# scaling, so a large upload is never copied at full size).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def load_image(image: Image.Image, field: str, max_pixels: int, scale: float = 1.0) -> Image.Image:
    """`decode_image`'s second half: an `open_image` result decoded to RGB, upright (EXIF
    orientation applied) and, with `scale` below 1, scaled down by it (Lanczos). A JPEG is then
    decoded straight at the smallest DCT scale still at least that size (`draft`). The full-size
    image is held once (no full-size copies), so its memory is bounded by max_pixels."""
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    try:
        if scale < 1.0 and image.format == "JPEG":
            image.draft("RGB", target)
        image.load()
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if image.mode != "RGB":
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        raise RequestError(field, "is truncated or corrupt", _allowed(max_pixels)) from None
    if scale < 1.0 and image.size != target:
        # reducing_gap: a box reduction first, then Lanczos over the last factor of 2 or less.
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    return image


def upload_bytes(data: str, field: str, allowed: str = "base64") -> bytes:
    """The bytes of a base64 upload (a data: URL prefix is accepted), or a RequestError naming `field`."""
    try:
        return base64.b64decode(_DATA_URL.sub("", data.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64", allowed) from None


def upload_sha256(data: str, field: str) -> str:
    """SHA-256 of an upload's bytes as sent: what PNG metadata records to identify an input file."""
    return hashlib.sha256(upload_bytes(data, field)).hexdigest()


def fit_mask(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """An inpainting mask fitted like its image (cover, centre crop), as 255 (repaint) where its grey
    value is at least 128 and 0 (keep) elsewhere: uint8 (height, width)."""
    grey = fit_image(mask.convert("L"), width, height)
    return np.where(grey >= 128, 255, 0).astype(np.uint8)


def fit_image(image: Image.Image, width: int, height: int) -> np.ndarray:
    """Scale to cover width x height and crop the centre: no stretching, no borders."""
    return np.asarray(ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS), dtype=np.uint8)
