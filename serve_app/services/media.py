"""PNG encoding with the generation parameters inside the file."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


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
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def encode_plain_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) to PNG bytes without metadata (control maps)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png_b64(image: np.ndarray, meta: dict, a1111: bool = True) -> str:
    return base64.b64encode(encode_png(image, meta, a1111)).decode("ascii")


def read_png_meta(data: bytes) -> dict:
    """The `genserve` JSON chunk of a PNG this service wrote."""
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text["genserve"])
