"""Fitting an enhanced prompt to the target model's text encoders.

CLIP keeps 77 tokens and silently cuts the rest (diffusers logs "The following part of your input
was truncated because CLIP can only handle sequences up to 77 tokens"). The enhancer's additions
come after the user's words, so it is always they that would be cut. Here the enhancer counts
tokens with the target's own tokenizers (`PromptForm.tokenizers`, loaded once per model source)
and leaves out those of its additions that do not fit, keeping the user's words whole and first;
what it left out is reported (`EnhancedPrompt.dropped`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from deployments.runtime.types import PromptForm, PromptTokenizer

Fits = Callable[[str], bool]
# Clause boundaries of an LLM's answer: after a comma, semicolon or full stop.
_CLAUSES = re.compile(r"(?<=[,;.])\s+")


def _load(spec: PromptTokenizer):
    from deployments.runtime.loading import is_tiny, pretrained_location

    if is_tiny(spec.source):
        from deployments.runtime import tiny

        return tiny.tiny_t5_tokenizer() if spec.kind == "t5" else tiny.tiny_clip_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pretrained_location(spec.source), subfolder=spec.subfolder)


class TokenBudget:
    """The target's tokenizers, each loaded once per (source, subfolder), shared by every request."""

    def __init__(self):
        self._tokenizers: dict[tuple[str, str, str], object] = {}
        self._lock = threading.Lock()

    def fits_for(self, target: PromptForm | None) -> Fits | None:
        """Whether a text fits every tokenizer of `target`; None when it names none (nothing to fit).
        Loads tokenizers the first time (blocking: call it off the event loop)."""
        if target is None or not target.tokenizers:
            return None
        tokenizers = [(self._tokenizer(spec), spec.max_tokens) for spec in target.tokenizers]

        def fits(text: str) -> bool:
            # verbose=False: counting a long text must not log the tokenizer's own length warning.
            return all(len(tokenizer(text, verbose=False)["input_ids"]) <= limit for tokenizer, limit in tokenizers)

        return fits

    def _tokenizer(self, spec: PromptTokenizer):
        key = (spec.source, spec.subfolder, spec.kind)
        with self._lock:
            if key not in self._tokenizers:
                self._tokenizers[key] = _load(spec)
            return self._tokenizers[key]


def fit_terms(kept: list[str], additions: list[str], fits: Fits | None) -> tuple[str, list[str]]:
    """`kept` (always, in order) joined with those `additions` that still fit, in order; and the
    additions left out. A later, shorter addition may fit where an earlier one did not."""
    parts = [part for part in kept if part]
    dropped = []
    for term in additions:
        if fits is None or fits(", ".join([*parts, term])):
            parts.append(term)
        else:
            dropped.append(term)
    return ", ".join(parts), dropped


def trim_clauses(text: str, fits: Fits | None) -> tuple[str, list[str]] | None:
    """`text` cut after its last clause that fits, and the clauses cut; None when not even the first
    clause fits (the caller then answers with the template)."""
    if fits is None or fits(text):
        return text, []
    clauses = _CLAUSES.split(text.strip())
    for count in range(len(clauses) - 1, 0, -1):
        head = " ".join(clauses[:count]).rstrip(",;")
        if fits(head):
            return head, clauses[count:]
    return None
