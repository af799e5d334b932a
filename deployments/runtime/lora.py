"""LoRA adapters in a replica: which ones a pipeline has on (`LoraManager`).

Not a deployment. Which adapters exist, and which family each is for, is the ingress's
`deployments.lora_registry.LoraRegistry`; it resolves each requested name to a `LoraRef` (a location
and a file name, never a path taken from a request) and the refs reach the generator in
`GenerationParams.loras`, where this module's `LoraManager` loads, caches and switches them.

The manager loads with `use_safetensors=True` and a `.safetensors` weight name, so diffusers never
falls back to a pickled checkpoint; a directory entry's path is checked again just before loading.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from deployments.runtime.types import LoraRef

logger = logging.getLogger("ray.serve")

SUFFIX = ".safetensors"


def directly_inside(directory: str, path: str) -> bool:
    """`path`'s real location is a regular file directly inside `directory`'s real location."""
    real = os.path.realpath(path)
    return os.path.dirname(real) == os.path.realpath(directory) and os.path.isfile(real)


def adapter_key(ref: LoraRef) -> str:
    """The adapter's name inside the pipeline: an identifier made from where it comes from (PEFT
    keeps adapters in module dicts, which refuse names with dots)."""
    digest = hashlib.sha256(f"{ref.local}\0{ref.location}\0{ref.weight_name}\0{ref.revision}".encode()).hexdigest()
    return f"lora_{digest[:16]}"


class LoraManager:
    """The LoRA state of one pipeline in one replica.

    `apply(refs)` before each pipeline call makes exactly `refs` active with their scales: adapters
    are loaded on first use (`load_lora_weights`), kept loaded for later requests (at most
    `cache_size`, least recently used deleted first with `delete_adapters`), and a call without
    refs disables every adapter, so one request's LoRA never reaches the next.

    Works with any diffusers pipeline that has a LoRA loader mixin (FluxPipeline,
    StableDiffusionXLPipeline, ...). Not thread-safe: call it where the pipeline is called, under
    the generator's lock.
    """

    def __init__(self, pipeline, cache_size: int = 8):
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1; got {cache_size}")
        self._pipeline = pipeline
        self.cache_size = cache_size
        self._loaded: OrderedDict[str, LoraRef] = OrderedDict()
        self._names: tuple[str, ...] = ()  # a snapshot for other threads (info() while a call runs)

    def apply(self, refs: Sequence[LoraRef]) -> None:
        if len(refs) > self.cache_size:
            raise ValueError(f"{len(refs)} LoRAs at once is more than the cache holds ({self.cache_size})")
        if not refs:
            if self._loaded:  # nothing was ever loaded: the pipeline has no LoRA layers to disable
                self._pipeline.disable_lora()
            return
        keys = [adapter_key(ref) for ref in refs]
        for ref, key in zip(refs, keys):
            self._ensure_loaded(ref, key, keep=keys)
        self._pipeline.set_adapters(keys, adapter_weights=[float(ref.scale) for ref in refs])
        # set_adapters picks the active adapters but does not undo an earlier disable_lora.
        self._pipeline.enable_lora()

    def loaded(self) -> list[str]:
        """Names of the adapters held, least recently used first."""
        return list(self._names)

    def _ensure_loaded(self, ref: LoraRef, key: str, keep: Sequence[str]) -> None:
        if key in self._loaded:
            self._loaded.move_to_end(key)
            self._names = tuple(loaded.name for loaded in self._loaded.values())
            return
        while len(self._loaded) >= self.cache_size:
            evict = next(loaded for loaded in self._loaded if loaded not in keep)
            self._pipeline.delete_adapters([evict])
            logger.info("LoRA %r unloaded (cache of %d full)", self._loaded.pop(evict).name, self.cache_size)
            self._names = tuple(loaded.name for loaded in self._loaded.values())
        self._load(ref, key)
        self._loaded[key] = ref
        self._names = tuple(loaded.name for loaded in self._loaded.values())

    def _load(self, ref: LoraRef, key: str) -> None:
        if not ref.weight_name.endswith(SUFFIX):
            raise ValueError(f"LoRA {ref.name!r}: only {SUFFIX} files are loaded; got {ref.weight_name!r}")
        if ref.local and not directly_inside(ref.location, os.path.join(ref.location, ref.weight_name)):
            raise ValueError(f"LoRA {ref.name!r} is no longer a file directly inside {ref.location}")
        try:
            self._pipeline.load_lora_weights(
                ref.location, weight_name=ref.weight_name, adapter_name=key, use_safetensors=True,
                local_files_only=ref.local,
            )
        except BaseException:
            self._discard(key)
            raise
        logger.info("LoRA %r loaded from %s", ref.name, Path(ref.location, ref.weight_name) if ref.local else ref.location)

    def _discard(self, key: str) -> None:
        """Remove whatever a failed load left behind, so the key can be loaded cleanly later."""
        present = {name for names in self._pipeline.get_list_adapters().values() for name in names}
        if key in present:
            self._pipeline.delete_adapters([key])
