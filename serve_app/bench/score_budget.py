"""`python -m serve_app.bench.score_budget`: what scoring a downscaled copy changes, and what it saves.

Two tables (docs/operations.md quotes them):
- drift: images with the 1/f amplitude spectrum of natural photographs, each scored at full size
  and as the copy the /v1/scores pixel budget makes (the same decode path, `load_image`): how far
  CLIP's input tensor moves (the real ViT-L/14 preprocessing: shorter side to 224, bicubic, centre
  crop, normalised) and each perceptual score;
- memory: the Ingress's decode of 4 uploads of 4096x4096 (well-compressed PNGs, as an attacker
  would send), peak resident memory of a fresh process, within the budget against without it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys

import numpy as np
from PIL import Image

CLIP_SIDE = 224


def natural_image(side: int, seed: int) -> np.ndarray:
    """A random RGB image whose amplitude spectrum falls as 1/f, like a photograph's."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / side)
    channels = []
    for _ in range(3):
        spectrum = falloff * np.exp(2j * np.pi * rng.random((side, side)))
        plane = np.real(np.fft.ifft2(spectrum))
        channels.append((plane - plane.mean()) / (4 * plane.std()))
    mixed = np.stack(channels, axis=-1) @ rng.uniform(0.3, 1.0, (3, 3))  # correlated channels, as in photos
    return np.clip(127.5 + 127.5 * mixed / np.abs(mixed).max(), 0, 255).astype(np.uint8)


def _b64_png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def drift(side: int, images: int) -> list[dict]:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from deployments.scoring.perceptual import perceptual_scores
    from serve_app.services.inputs import load_image, open_image

    processor = CLIPImageProcessorPil()  # OpenAI CLIP's: shortest edge 224, bicubic, centre crop 224
    uploads = [_b64_png(natural_image(side, seed)) for seed in range(images)]
    full = [np.asarray(load_image(open_image(data, "image", side * side), "image", side * side)) for data in uploads]
    full_inputs = processor(images=full, return_tensors="np").pixel_values
    full_scores = [perceptual_scores(image) for image in full]
    rows = []
    for factor in (0.5, 0.25, CLIP_SIDE / side):
        copies = [np.asarray(load_image(open_image(data, "image", side * side), "image", side * side, factor))
                  for data in uploads]
        inputs = processor(images=copies, return_tensors="np").pixel_values
        # Normalised units times the channel std (~0.27) times 255: the difference in 0-255 pixel levels.
        levels = np.abs(inputs - full_inputs) * np.asarray(processor.image_std)[None, :, None, None] * 255
        scores = [perceptual_scores(image) for image in copies]
        row = {"scale": factor, "side": copies[0].shape[0], "clip_mean": float(levels.mean()),
               "clip_p99": float(np.percentile(levels, 99))}
        for name in ("brightness", "contrast", "saturation"):
            row[name] = max(abs(after[name] - before[name]) for after, before in zip(scores, full_scores))
        row["sharpness_ratio"] = float(np.median([after["sharpness"] / before["sharpness"]
                                                  for after, before in zip(scores, full_scores)]))
        rows.append(row)
    return rows


def _compressible(side: int, seed: int) -> str:
    """A smooth gradient PNG: a large image in a small body (what the body limit lets through)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)),
                      np.full((side, side), 37.0 * seed % 255)], axis=-1).astype(np.uint8)
    return _b64_png(image)


def _memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _decode_peak(side: int, count: int, budget: int | None) -> dict:
    """Run in a fresh process: decode `count` uploads as ScoreService does; how much the peak
    resident memory grew over what the request body already held (Linux: VmHWM, reset first)."""
    import gc

    from serve_app.config import AppArgs, ScoresConfig
    from serve_app.protocol.schemas import ScoreRequest
    from serve_app.services.scores import ScoreService, scales
    from serve_app.services.settings import Settings

    request = ScoreRequest(prompt="x", images=[_compressible(side, seed) for seed in range(count)])
    cap = count * side * side
    settings = Settings.from_args(AppArgs(max_input_pixels=side * side,
                                          scores=ScoresConfig(pixel_budget=budget or cap, max_total_pixels=cap)))
    service = ScoreService(settings, scorer=None)  # decoding only: nothing is scored
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current resident size
    before = _memory_mib("VmRSS")
    opened = service._open(request)
    factors = scales([image.size for image in opened], service.budget.pixel_budget, CLIP_SIDE)
    decoded = service._decode(opened, factors)
    return {"budget": service.budget.pixel_budget, "body_mib": sum(map(len, request.images)) / 2**20,
            "scored_pixels": sum(image.shape[0] * image.shape[1] for image in decoded),
            "decoded_mib": sum(image.nbytes for image in decoded) / 2**20,
            "peak_rss_growth_mib": _memory_mib("VmHWM") - before}


def memory(side: int, count: int, budget: int) -> list[dict]:
    rows = []
    for which in (None, budget):
        code = (f"import json; from serve_app.bench.score_budget import _decode_peak; "
                f"print(json.dumps(_decode_peak({side}, {count}, {which!r})))")
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2048, help="side of the drift test's square images")
    parser.add_argument("--images", type=int, default=4, help="images in the drift test")
    parser.add_argument("--budget", type=int, default=16 * 1024 * 1024, help="scores.pixel_budget of the memory test")
    args = parser.parse_args(argv)
    print(f"drift: {args.images} 1/f images of {args.side}x{args.side}; CLIP input in 0-255 levels "
          "(mean, 99th percentile); perceptual: the largest absolute change; sharpness: median copy/full")
    print(f"{'scale':>7}{'side':>6}{'clip mean':>11}{'clip p99':>10}{'bright':>9}{'contrast':>10}{'satur':>8}"
          f"{'sharp x':>9}")
    for row in drift(args.side, args.images):
        print(f"{row['scale']:>7.3f}{row['side']:>6}{row['clip_mean']:>11.2f}{row['clip_p99']:>10.2f}"
              f"{row['brightness']:>9.4f}{row['contrast']:>10.4f}{row['saturation']:>8.4f}{row['sharpness_ratio']:>9.2f}")
    print("\nmemory: decoding 4 uploads of 4096x4096 as ScoreService does (fresh process each)")
    print(f"{'budget px':>11}{'body MiB':>10}{'scored px':>12}{'arrays MiB':>12}{'peak RSS growth MiB':>21}")
    rows = memory(4096, 4, args.budget)
    for row in rows:
        print(f"{row['budget']:>11}{row['body_mib']:>10.1f}{row['scored_pixels']:>12}{row['decoded_mib']:>12.1f}"
              f"{row['peak_rss_growth_mib']:>21.1f}")
    print(f"ratio (with budget / without): {rows[1]['peak_rss_growth_mib'] / rows[0]['peak_rss_growth_mib']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
