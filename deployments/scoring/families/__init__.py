"""Scorer families, as image model families are: one module per family, looked up by name or import path.

- `base`: what a scorer family declares (`ScorerFamily`: its metrics, options, licence, loader)
  and what a loaded scorer does (`LoadedScorer`), over a CLIP tower (`ClipTower`);
- `clip`: CLIPScore alignment, the aesthetic and aspect text pairs, the LAION aesthetic head;
- `hps`: HPSv2.1 (an OpenCLIP ViT-H-14 checkpoint, converted to a transformers CLIPModel at load);
- `pickscore`: PickScore v1 (a transformers CLIPModel).

A `scorers:` entry names a built-in family or one anywhere on the Python path
(`family: my_package.my_scorer:FAMILY`). Adding a scorer is one module and a config entry.
"""

from __future__ import annotations

from functools import cache

from deployments.families import _lookup
from deployments.scoring.families.base import ClipTower, LoadedScorer, ScorerFamily

__all__ = ["SCORER_BUILTIN", "ClipTower", "LoadedScorer", "ScorerFamily", "get_scorer_family"]

# Built-in scorer family name -> its module. Modules import only pydantic at the top.
SCORER_BUILTIN: dict[str, str] = {
    "clip": "deployments.scoring.families.clip",
    "hps": "deployments.scoring.families.hps",
    "pickscore": "deployments.scoring.families.pickscore",
}


@cache
def get_scorer_family(name: str) -> ScorerFamily:
    """The scorer family called `name`: a built-in one, or `module[:attribute]` (attribute `FAMILY`)."""
    return _lookup(name, SCORER_BUILTIN, ScorerFamily, "scorer family")
