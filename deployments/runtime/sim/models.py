"""Simulated one-model deployments: the scorer's CLIP (here) and the enhancer's LLM
(`deployments.enhancer.llm.SimulatedLlm`, built on `ledger_with` and `timing.model_call_s`).

Both keep the code around them real: the scorer still tokenizes, preprocesses the images with CLIP's
own image processor (224 px), runs its perceptual checks and its LAION head (a random one: no
weights are fetched for a placeholder), and only the CLIP forward passes are modelled; the enhancer
still builds its chat messages, applies its time budget and guardrails, and only `generate` is
modelled. Each holds its weights in the GPU's ledger and sleeps the modelled time of each call.
"""

from __future__ import annotations

import hashlib
import threading
import time
from types import SimpleNamespace

import numpy as np

from deployments.runtime.sim import flops as counted
from deployments.runtime.sim import memory, timing
from deployments.sim_profiles import profile


def ledger_with(arch: str, placement, owner: str) -> memory.Ledger:
    card = profile(placement.simulated)
    ledger = memory.Ledger(memory.gpu_key(card.key), card.memory_bytes, card.key)
    ledger.reserve("cuda-context", memory.CUDA_CONTEXT_BYTES)
    weights = memory.weight_bytes(arch, placement.dtype_name)
    ledger.reserve(f"{owner}:weights", weights)
    if placement.simulated_cold_start:
        timing.wait_cold_start(card, weights, weights, owner)
    return ledger


def _unit_rows(keys: list[bytes], width: int):
    """One deterministic unit vector per key (a placeholder embedding)."""
    import torch

    rows = [np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
            .standard_normal(width).astype(np.float32) for key in keys]
    array = torch.from_numpy(np.stack(rows))
    return array / array.norm(dim=-1, keepdim=True)


class SimulatedClip:
    """Stands in for `CLIPModel` in the scorer: embeddings derived from the inputs' bytes, each
    forward pass taking the modelled time of CLIP ViT-L/14 on the card."""

    def __init__(self, source: str, placement):
        import torch

        self.arch = counted.architecture_for(source)
        self.card = profile(placement.simulated)
        self.dtype = placement.dtype_name
        self.config = SimpleNamespace(projection_dim=counted.architecture(self.arch)["model"]["config"]["projection_dim"])
        self.logit_scale = torch.tensor(float(np.log(100.0)))  # CLIP's trained temperature: exp() = 100
        self.ledger = ledger_with(self.arch, placement, "clip")
        self._stream = threading.Lock()

    def to(self, *_, **__) -> "SimulatedClip":
        return self

    def eval(self) -> "SimulatedClip":
        return self

    def get_image_features(self, pixel_values):
        count = len(pixel_values)
        self._wait("clip:call", 257, count, [({"part": "vision"}, count)])
        return SimpleNamespace(pooler_output=_unit_rows([row.numpy().tobytes() for row in pixel_values.float()],
                                                        self.config.projection_dim))

    def get_text_features(self, input_ids, **_):
        count = len(input_ids)
        self._wait("clip:text", counted.CLIP_TOKENS, count, [({"tokens": counted.CLIP_TOKENS}, count)])
        return SimpleNamespace(pooler_output=_unit_rows([row.numpy().tobytes() for row in input_ids],
                                                        self.config.projection_dim))

    def _wait(self, owner: str, tokens: int, batch: int, passes: list) -> None:
        # One forward pass at a time, as on a card's stream: the scorer runs the text tower on a
        # second thread, and two modelled passes must not overlap where real kernels would queue.
        with self._stream:
            self.ledger.reserve(owner, memory.model_activation_bytes(self.arch, tokens, batch, self.dtype))
            try:
                time.sleep(timing.model_call_s(self.arch, self.card, passes))
            finally:
                self.ledger.release(owner)


def simulated_clip_parts(source: str, placement) -> dict:
    """The scorer's parts on a simulated device: the modelled CLIP, the tiny byte-level tokenizer
    (77 positions, as CLIP's), and CLIP's own image processor at its published 224 px."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from deployments.runtime.tiny import tiny_clip_tokenizer

    return {"model": SimulatedClip(source, placement), "tokenizer": tiny_clip_tokenizer(),
            "image_processor": CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})}

