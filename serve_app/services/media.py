"""Image encoding with the generation parameters inside the file: PNG (text chunks) by default, or
JPEG/WebP (EXIF), which a request asks for with `output_format`.

Encoding runs on the ingress's CPU for every image, so it is set for speed (measured on this
project's 2-core machine, one 1024x1024 image, Pillow: docs/benchmarks.md): PNG at zlib level 1
(about 0.6x the time of Pillow's default level 6, about 10% more bytes), WebP at method 0 (about a
quarter of the default method 4's time, no larger at quality 90); JPEG is the cheapest by far.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from serve_app.protocol.schemas import DEFAULT_IMAGE_QUALITY, ImageRequest

PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 0
EXIF_IMAGE_DESCRIPTION = 0x010E


def encoding_of(request: ImageRequest) -> dict:
    """How a request's images are encoded: `encode_image_b64`'s output_format and quality."""
    quality = DEFAULT_IMAGE_QUALITY if request.output_compression is None else request.output_compression
    return {"output_format": request.output_format, "quality": quality}


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text AUTOMATIC1111 writes, which its PNG Info tab and many tools read.

    LoRAs appear as A1111's prompt tags, `<lora:name:scale>`, after the prompt."""
    tags = "".join(f" <lora:{lora['name']}:{lora['scale']:g}>" for lora in meta.get("loras") or ())
    lines = [meta["prompt"] + tags]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    settings = [
        f"Steps: {meta['steps']}",
        f"CFG scale: {meta['guidance_scale']:g}",
        f"Seed: {meta['seed']}",
        f"Size: {meta['width']}x{meta['height']}",
        f"Model: {meta['model']}",
    ]
    # Image-to-image, inpainting and hires fix, in A1111's words (it never combines the first two with
    # the third; here the edit's strength comes first).
    hires = meta.get("hires")
    strength = meta.get("strength", hires and hires["strength"])
    if strength is not None:
        settings.append(f"Denoising strength: {strength:g}")
    if meta.get("mask_blur") is not None:
        settings.append(f"Mask blur: {meta['mask_blur']}")
    if hires:
        settings += [f"Hires upscale: {hires['scale']:g}", f"Hires steps: {hires['steps']}", "Hires upscaler: Lanczos"]
    if meta.get("generator") == "cpu":  # A1111's name for noise drawn on the CPU whatever the device
        settings.append("RNG: CPU")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def encode_png(image: np.ndarray, meta: dict, a1111: bool = True) -> bytes:
    """uint8 (H, W, 3) to PNG bytes carrying `parameters` (A1111 text; not for images whose steps and
    seed are unknown, as a remote API's) and `genserve` (JSON)."""
    info = PngInfo()
    if a1111:
        info.add_text("parameters", a1111_parameters(meta))
    info.add_text("genserve", json.dumps(meta, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_lossy(image: np.ndarray, meta: dict, output_format: str, quality: int) -> bytes:
    """uint8 (H, W, 3) to JPEG or WebP bytes at `quality` (0-100), `meta` as JSON in the EXIF
    ImageDescription (these formats have no text chunks)."""
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(meta, sort_keys=True)
    options = {"method": WEBP_METHOD} if output_format == "webp" else {}
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=output_format.upper(), quality=quality, exif=exif, **options)
    return buffer.getvalue()


def encode_image_b64(image: np.ndarray, meta: dict, output_format: str = "png", quality: int = 90,
                     a1111: bool = True) -> dict:
    """The `GeneratedImage` fields of one image in `output_format`: {output_format, b64_png or b64_image}."""
    if output_format == "png":
        return {"output_format": "png", "b64_png": encode_png_b64(image, meta, a1111)}
    data = encode_lossy(image, meta, output_format, quality)
    return {"output_format": output_format, "b64_image": base64.b64encode(data).decode("ascii")}


def encode_plain_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) to PNG bytes without metadata (control maps)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_png_b64(image: np.ndarray, meta: dict, a1111: bool = True) -> str:
    return base64.b64encode(encode_png(image, meta, a1111)).decode("ascii")


def read_png_meta(data: bytes) -> dict:
    """The `genserve` JSON chunk of a PNG this service wrote."""
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text["genserve"])


def read_image_meta(data: bytes) -> dict:
    """The generation parameters of an image this service wrote, PNG, JPEG or WebP."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return json.loads(image.text["genserve"])
        return json.loads(image.getexif()[EXIF_IMAGE_DESCRIPTION])
