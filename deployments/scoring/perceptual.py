"""Perceptual checks of an image's pixels, without a model: brightness, contrast, saturation, sharpness.

All four are computed with numpy on the image as given (no resizing), so they are cheap and
deterministic; higher is not always better (a night scene is meant to be dark), they describe.

- `brightness`: mean luma (ITU-R BT.601 weights) on a 0-1 scale: 0 black, 1 white.
- `contrast`: RMS contrast, the standard deviation of luma, scaled to 0-1 (x2, since the standard
  deviation of values in 0-1 is at most 0.5): 0 for a flat image, 1 for half black, half white.
- `saturation`: mean HSV saturation, (max - min) / max of each pixel's RGB, 0-1: 0 for grey.
- `sharpness`: variance of the 4-neighbour Laplacian of luma on the 0-255 scale (the usual
  "variance of the Laplacian" focus measure, as OpenCV's `cv2.Laplacian(grey, CV_64F).var()`
  gives it): 0 for a flat image, unbounded above; below about 100 usually looks blurry. It
  depends on resolution, so compare images of the same size.
"""

from __future__ import annotations

import numpy as np

PERCEPTUAL_RANGES = {
    "brightness": (0.0, 1.0),
    "contrast": (0.0, 1.0),
    "saturation": (0.0, 1.0),
    "sharpness": (0.0, float("inf")),
}


def perceptual_scores(image: np.ndarray) -> dict[str, float]:
    """The four checks of one uint8 RGB image of shape (H, W, 3)."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 of shape (H, W, 3); got {image.dtype} {image.shape}")
    # Planar copies: numpy is several times faster on contiguous planes than on interleaved RGB.
    red, green, blue = np.ascontiguousarray(image.transpose(2, 0, 1))
    luma = np.float32(0.299) * red + np.float32(0.587) * green + np.float32(0.114) * blue  # 0-255
    brightest = np.maximum(np.maximum(red, green), blue)
    spread = brightest - np.minimum(np.minimum(red, green), blue)
    saturation = spread.astype(np.float32) / np.maximum(brightest, 1).astype(np.float32)  # 0 where black
    return {
        "brightness": float(luma.mean() / 255.0),
        "contrast": float(min(1.0, 2.0 * luma.std() / 255.0)),
        "saturation": float(saturation.mean()),
        "sharpness": _laplacian_variance(luma),
    }


def _laplacian_variance(luma: np.ndarray) -> float:
    if luma.shape[0] < 3 or luma.shape[1] < 3:
        return 0.0
    centre = luma[1:-1, 1:-1]
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - np.float32(4.0) * centre
    return float(laplacian.var())
