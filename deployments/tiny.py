"""Every tiny random-weight model by name, written to a folder: what `genserve save-tiny` and the
tests use to load tiny models back through `from_pretrained`, exactly the path a hub id or local
folder takes.

The models themselves are built by their owners: each family's `build_tiny`, the LAION head's
`deployments.scoring.laion_head`, and the shared building blocks (tokenizers, the tiny CLIP, LLM,
depth and SVD models) in `deployments.runtime.tiny`, re-exported here by their old names.
"""

from __future__ import annotations

from pathlib import Path

from deployments.families import BUILTIN, VIDEO_BUILTIN, get_family, get_video_family
from deployments.families.sdxl import build_tiny_sdxl_controlnet
from deployments.runtime.tiny import (
    CHATML_TEMPLATE,
    CLIP_MAX_TOKENS,
    build_tiny_clip,
    build_tiny_depth,
    build_tiny_llm,
    build_tiny_svd,
    clip_text_config,
    eval_mode,
    seeded,
    tiny_clip_tokenizer,
    tiny_llm_tokenizer,
    tiny_t5_tokenizer,
)
from deployments.scoring.families import SCORER_BUILTIN, get_scorer_family
from deployments.scoring.laion_head import build_tiny_laion_head, save_head

# The building blocks' old home was this module: their names stay importable from it.
__all__ = ["CHATML_TEMPLATE", "CLIP_MAX_TOKENS", "OTHER_TINY", "build_tiny_clip", "build_tiny_depth", "build_tiny_laion_head",
           "build_tiny_llm", "build_tiny_svd", "clip_text_config", "eval_mode", "save_tiny", "seeded",
           "tiny_clip_tokenizer", "tiny_kinds", "tiny_llm_tokenizer", "tiny_t5_tokenizer"]

# Tiny models other than the image and video families (those come from deployments.families).
OTHER_TINY = ("clip", "llm", "laion", "sdxl-controlnet", "depth")


def save_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny model in the library's own layout, loadable by the real loading path.

    `kind` is an image model family (`deployments.families`: flux, sdxl, sd15, ...), a video family
    (svd, ltx, wan, ...; animatediff: its motion adapter) or one of the other tiny models: clip, llm, laion, sdxl-controlnet, depth."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind in BUILTIN:
        get_family(kind).save_tiny(folder, seed)
    elif kind in VIDEO_BUILTIN:
        get_video_family(kind).save_tiny(folder, seed)
    elif kind == "clip":
        for part in build_tiny_clip(seed).values():
            part.save_pretrained(folder)
    elif kind in SCORER_BUILTIN:
        get_scorer_family(kind).save_tiny(folder, seed)
    elif kind == "llm":
        for part in build_tiny_llm(seed).values():
            part.save_pretrained(folder)
    elif kind == "laion":
        save_head(build_tiny_laion_head(seed=seed), folder / "laion-head.safetensors")
    elif kind == "sdxl-controlnet":
        build_tiny_sdxl_controlnet(seed).save_pretrained(folder)
    elif kind == "depth":
        for part in build_tiny_depth(seed).values():
            part.save_pretrained(folder)
    else:
        raise ValueError(f"unknown tiny model {kind!r}; known: {', '.join(tiny_kinds())}")
    return folder


def tiny_kinds() -> tuple[str, ...]:
    """What `save_tiny` (and `genserve save-tiny`) can write: every built-in image and video family, and the rest."""
    return (*BUILTIN, *VIDEO_BUILTIN, *OTHER_TINY, *(kind for kind in SCORER_BUILTIN if kind not in OTHER_TINY))
