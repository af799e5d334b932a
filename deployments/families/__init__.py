"""The model family registry: one module per family, looked up by name or by import path.

- `base`: what a family declares (`ImageFamily`) and what a loaded model does (`LoadedImageModel`);
- `flux`, `flux2`, `sdxl`, `sd15`: the built-in families, each a module with a `FAMILY` instance
  (docs/models.md has them all).
- `video_base`: what a video family declares (`VideoFamily`: capabilities, frame and size rules, its
  own request parameters, memory options, tiny builder); `svd`, `ltx`, `animatediff`: the built-in video families,
  looked up the same way by `get_video_family` (`video_models:` entries).

A config entry names a built-in family (`family: sdxl`) or one defined anywhere on the Python path
by import path (`family: my_package.my_family:FAMILY`, or `my_package.my_family`, whose `FAMILY` is
taken). Adding a family is one module and a config entry; nothing else lists families: the
built-in ones are the modules of this package that define a `FAMILY` (`_discover`), in module-name
order.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from deployments.families.base import ImageFamily, LoadedImageModel, LoraSignature, NoOptions

__all__ = ["BUILTIN", "VIDEO_BUILTIN", "ImageFamily", "LoadedImageModel", "LoraSignature", "NoOptions",
           "get_family", "get_video_family", "lora_family_of"]

# Modules of this package that hold what families share, not a family.
_SHARED_MODULES = frozenset({"base", "video_base"})


def _discover() -> tuple[dict[str, str], dict[str, str]]:
    """Built-in image and video family name -> the module that defines it: every module of this
    package with a `FAMILY`. Family modules import only pydantic at the top, so this stays cheap
    (torch and diffusers load when a model does)."""
    from deployments.families.video_base import VideoFamily

    image: dict[str, str] = {}
    video: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name in _SHARED_MODULES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, ImageFamily):
            image[family.name] = module.__name__
        elif isinstance(family, VideoFamily):
            video[family.name] = module.__name__
    return image, video


class UnknownFamily(ValueError):
    pass


def _lookup(name: str, builtin: dict[str, str], kind: type, what: str):
    module_name, _, attribute = builtin.get(name, name).partition(":")
    if name not in builtin and "." not in module_name:
        raise UnknownFamily(
            f"unknown {what} {name!r}; known: {', '.join(builtin)} (or an import path 'package.module:FAMILY')"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownFamily(f"{what} {name!r} could not be imported: {error}") from error
    family = getattr(module, attribute or "FAMILY", None)
    if not isinstance(family, kind):
        raise UnknownFamily(f"{what} {name!r}: {module_name}.{attribute or 'FAMILY'} is not an instance of {kind.__name__}")
    return family


@cache
def get_family(name: str) -> ImageFamily:
    """The family called `name`: a built-in one, or `module[:attribute]` (attribute `FAMILY` by default)."""
    return _lookup(name, BUILTIN, ImageFamily, "family")


@cache
def get_video_family(name: str):
    """The video family called `name`: a built-in one (`VIDEO_BUILTIN`) or `module[:attribute]`."""
    from deployments.families.video_base import VideoFamily

    return _lookup(name, VIDEO_BUILTIN, VideoFamily, "video family")


def builtin_families() -> list[ImageFamily]:
    return [get_family(name) for name in BUILTIN]


def lora_family_of(hints: list[str], keys: list[str], cross_attention_dim, families: list[ImageFamily]) -> str:
    """The family a LoRA file is for, from its header: metadata hints first, then tensor names,
    then (UNet-only adapters) the width of the text embeddings its cross-attention takes.
    'unknown' when no family's signature matches. `cross_attention_dim()` reads that width lazily."""
    signed = sorted(((family.name, family.lora) for family in families if family.lora is not None),
                    key=lambda pair: -pair[1].precedence)  # stable: equal precedence keeps the given order
    for hint in hints:
        for name, signature in signed:
            if signature.matches_metadata(hint):
                return name
    for name, signature in signed:
        if signature.matches_keys(keys):
            return name
    if any(key.startswith(LoraSignature.UNET_PREFIXES) for key in keys):
        width = cross_attention_dim()
        for name, signature in signed:
            if width in signature.cross_attention_dims:
                return name
        for name, signature in signed:
            if signature.unet_fallback:
                return name
    return "unknown"


# Built-in image family name -> its module (`image_models:` entries), and the same for video
# (`video_models:` entries). Found, not listed: a new family module is a new built-in.
BUILTIN, VIDEO_BUILTIN = _discover()
