"""Which weight files a model source needs: one rule for `genserve download` and for loading.

A model deployment names its weights as `WeightSource`s (a hub id or folder, how it is laid out,
and the variant its dtype prefers). `select_files` picks, from a repo's file list, exactly the
files loading reads: configs, tokenizers and safetensors only, the variant's safetensors where a
folder has them and the plain ones where it has not, and for a diffusers pipeline only the
component folders its `model_index.json` names (hub repos also hold single-file checkpoints of
many GiB that `from_pretrained` never reads). `local_variant` tells loading which variant the
files on disk are, so it loads exactly what was downloaded, offline.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deployments.config import TINY, is_local_path, local_path

# "processor": a tokenizer and image processor only (the preference scorers take OpenCLIP ViT-H-14's
# from a repo whose weights they do not use).
Layout = Literal["diffusers-pipeline", "diffusers-model", "transformers", "processor", "file"]

# Small files loading reads besides weights: configs, tokenizers (json, txt, SentencePiece models).
_SUPPORT_SUFFIXES = (".json", ".txt", ".model")
# `name.<variant>.safetensors`, sharded `name.<variant>-00001-of-00002.safetensors`, and the
# sharded index `name.safetensors.index.<variant>.json` (diffusers' and transformers' naming).
_VARIANT_WEIGHTS = re.compile(r"^[^.]+\.(?P<variant>[A-Za-z0-9_]+)(?:-\d{5}-of-\d{5})?\.safetensors$")
_VARIANT_INDEX = re.compile(r"^[^.]+\.safetensors\.index\.(?P<variant>[A-Za-z0-9_]+)\.json$")


@dataclass(frozen=True)
class WeightSource:
    """Weights one deployment loads. `role` says what for (shown in plans); `source` is a hub id,
    a folder or 'tiny'; `variant` is the one loading asks for when the files have it (fp16 for a
    16-bit dtype where a family publishes one); `filename` names the one file of a `file` source."""

    role: str
    source: str
    layout: Layout
    variant: str | None = None
    filename: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.source != TINY and not is_local_path(self.source)


def variant_for(variants: Mapping[str, str], dtype_name: str) -> str | None:
    """The weight variant to fetch for a dtype ('auto' is bf16: downloads are for CUDA)."""
    return variants.get("bfloat16" if dtype_name == "auto" else dtype_name)


def _variant_of(name: str) -> str | None:
    match = _VARIANT_WEIGHTS.match(name) or _VARIANT_INDEX.match(name)
    return match.group("variant") if match else None


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or ".safetensors.index." in name or name.endswith(".safetensors.index.json")


def select_files(files: Iterable[str], layout: Layout, variant: str | None = None,
                 components: Iterable[str] | None = None, filename: str | None = None) -> list[str]:
    """The files of a repo listing that loading reads; see the module docstring.

    `components`: a pipeline's component folders (from its model_index.json); others are skipped.
    """
    files = sorted(files)
    if layout == "file":
        return [filename] if filename in files else []
    if layout == "diffusers-pipeline":
        folders = set(components or ())
        files = [f for f in files if f == "model_index.json" or f.split("/", 1)[0] in folders and "/" in f]
    else:  # a single model: its files at the top level only
        files = [f for f in files if "/" not in f]
    by_folder: dict[str, list[str]] = {}
    for name in files:
        by_folder.setdefault(os.path.dirname(name), []).append(name)
    chosen: list[str] = []
    for folder_files in by_folder.values():
        weights = [f for f in folder_files if _is_weights(os.path.basename(f))]
        has_variant = variant is not None and any(_variant_of(os.path.basename(f)) == variant for f in weights)
        wanted = variant if has_variant else None
        if layout != "processor":
            chosen += [f for f in weights if _variant_of(os.path.basename(f)) == wanted]
        chosen += [f for f in folder_files if f not in weights and f.endswith(_SUPPORT_SUFFIXES)]
    return sorted(chosen)


def pipeline_components(model_index: Mapping) -> list[str]:
    """The component folders of a diffusers pipeline: model_index.json's entries that name a class."""
    return sorted(key for key, value in model_index.items()
                  if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None)


def local_folder(source: str) -> Path | None:
    """Where a source's files are on this machine: its folder, or the hub cache's snapshot of a
    repo id (None when it is not cached: loading then downloads, if the hub is reachable)."""
    if is_local_path(source):
        path = local_path(source)
        return path if path.is_dir() else None
    from huggingface_hub import try_to_load_from_cache

    # A top-level file every diffusers or transformers repo has locates the cached snapshot
    # (`snapshot_download(local_files_only=True)` refuses a snapshot holding only some files).
    for probe in ("model_index.json", "config.json"):
        found = try_to_load_from_cache(source, probe)
        if isinstance(found, str):
            return Path(found).parent
    return None


def local_variant(source: str, variant: str | None) -> str | None:
    """`variant` if the files on disk for `source` include its weights, else None (plain weights).

    Not cached at all: None, so an online load fetches the plain weights, which every repo has.
    """
    if variant is None:
        return None
    folder = local_folder(source)
    if folder is None:
        return None
    return variant if any(_variant_of(path.name) == variant for path in folder.rglob("*.safetensors")) else None
