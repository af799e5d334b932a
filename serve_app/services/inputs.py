"""Decoding user-supplied images safely: format, size limit before decoding, orientation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.services.validation import RequestError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """Base64 PNG/JPEG/WebP (optionally a data: URL) to an RGB image, or a RequestError naming `field`.

    The pixel count is read from the header and checked before the pixels are decoded, so a
    decompression bomb is refused without allocating it.
    """
    allowed = f"base64 {', '.join(ALLOWED_FORMATS)}, at most {max_pixels} pixels"
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
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(field, f"{width}x{height} is {width * height} pixels, over the limit", allowed)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError):
        raise RequestError(field, "is truncated or corrupt", allowed) from None
    return image.convert("RGB")


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
