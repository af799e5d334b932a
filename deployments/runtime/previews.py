"""Small pictures for people watching: a denoising preview from the latents, and thumbnails.

The preview is the cheap approximate decode ComfyUI's previews use: each latent channel maps
linearly to RGB (a family's `preview_factors`, published for its VAE) instead of running the VAE.
It costs a matrix product on a latent 1/8 of the image's side, so it can run on every reported step.
"""

from __future__ import annotations

import base64
import io

import numpy as np


def small_png_data_url(image: np.ndarray, max_side: int = 96) -> str:
    """`image` (H, W, 3) uint8 as a PNG data: URL, shrunk so its longest side is at most `max_side`."""
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def latent_rgb(latents, factors: tuple[tuple[float, float, float], ...], bias: tuple[float, float, float]):
    """The first image of a (B, C, h, w) latent batch as (h, w, 3) uint8 through the C x 3 `factors`;
    None when the latent has another channel count (a tiny test model, say)."""
    import torch

    latent = latents[0].float().cpu()
    if latent.ndim != 3 or latent.shape[0] != len(factors):
        return None
    rgb = torch.einsum("chw,cr->hwr", latent, torch.tensor(factors)) + torch.tensor(bias)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
