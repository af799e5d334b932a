"""Which LoRA adapters exist, and which model family each is for: the registry the ingress and the
job runner resolve requested names against.

Not a deployment. The ingress holds a `LoraRegistry`, resolves each requested name to a `LoraRef`
(a location and a file name, never a path taken from a request) and sends the refs to the
generator in `GenerationParams.loras`; the generator's `deployments.runtime.lora.LoraManager`
loads, caches and switches them.

Safety rules, in order:
- A name is checked as text first (`deployments.names.check_lora_name`): empty, over 128 characters,
  or holding `/`, `\\`, `..` or a control character is refused before anything else happens. An
  unknown name is refused by a dictionary lookup. Neither reads a file.
- The registry lists only `*.safetensors` files directly inside the configured directory whose real
  path (symlinks resolved) is still directly inside it; other files (`.bin`, `.ckpt`, `.pt`, ...),
  sub-folders and symlinks leading out are never listed, so they can never be named.
- Hub entries come from the config only (`LoraConfig.hub`), each a repo id and a `.safetensors`
  file name.
- The manager loads `.safetensors` files only and checks a directory entry's path again just
  before loading (`deployments.runtime.lora`).

Model families are read from the file's safetensors header (metadata and tensor names, no tensor
data), against the `LoraSignature` each model family declares (`deployments.families`); a file no
family claims is `unknown`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from deployments.families import BUILTIN, get_family, lora_family_of
from deployments.names import lora_name_problem
from deployments.runtime.lora import SUFFIX, directly_inside
from deployments.runtime.types import LoraRef

logger = logging.getLogger("ray.serve")


class LoraNameError(ValueError):
    """A requested LoRA name that is malformed or not in the registry; `allowed` says what is."""

    def __init__(self, message: str, allowed: str):
        super().__init__(message)
        self.allowed = allowed


def detect_family(path: str | os.PathLike, families: Iterable[str] | None = None) -> str:
    """The model family a LoRA file is for, from its safetensors header only (no tensor is loaded):
    whichever of `families` (names; default: the built-in ones) declares a matching `LoraSignature`."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        # kohya-ss sd-scripts write ss_base_model_version; the Stability "modelspec" writes an architecture.
        hints = [metadata.get(key, "").lower() for key in ("ss_base_model_version", "modelspec.architecture")]
        keys = list(handle.keys())

        def cross_attention_dim() -> int | None:
            # The UNet's cross-attention key projection takes text embeddings (768 wide in SD 1.x,
            # 2048 in SDXL); its LoRA "down"/"A" matrix has that many columns (shape from the header).
            for key in keys:
                if "attn2" in key and "to_k" in key and ("lora_A" in key or "lora.down" in key or "lora_down" in key):
                    return handle.get_slice(key).get_shape()[-1]
            return None

        return lora_family_of([hint for hint in hints if hint], keys, cross_attention_dim,
                              [get_family(name) for name in (BUILTIN if families is None else families)])


@dataclass(frozen=True)
class LoraEntry:
    """One available adapter. `location` is an absolute directory (origin 'dir') or a repo id ('hub')."""

    name: str
    family: str
    origin: str
    location: str
    weight_name: str
    revision: str = ""

    def ref(self, scale: float) -> LoraRef:
        return LoraRef(name=self.name, location=self.location, weight_name=self.weight_name, scale=scale,
                       local=self.origin == "dir", revision=self.revision)

    def public(self) -> dict:
        entry = {"name": self.name, "family": self.family, "origin": self.origin}
        if self.origin == "hub":  # a server-side directory path is not the client's business
            entry.update(repo=self.location, weight_name=self.weight_name)
        return entry


class LoraRegistry:
    """The adapters a request may name: `*.safetensors` files of one directory, plus hub entries.

    The directory is scanned when the registry is made and again whenever its modification time
    changes (a file added or removed), checked on each lookup with one `stat`. A missing directory
    is an empty one. Hub entries win over a file of the same name. Plain data, so it pickles to
    the ingress and the job runner.
    """

    def __init__(self, directory: str | os.PathLike | None = None, hub: Iterable = (), max_per_request: int = 4,
                 families: Iterable[str] | None = None):
        # The families whose LoRA signatures files are matched against, by name (None: the built-in ones).
        self._family_names = None if families is None else tuple(families)
        self.directory = None if directory is None else os.path.realpath(os.fspath(directory))
        self.max_per_request = max_per_request
        self._hub = {
            entry.name: LoraEntry(entry.name, entry.family, "hub", entry.repo, entry.weight_name) for entry in hub
        }
        self._files: dict[str, LoraEntry] = {}
        self._scanned_mtime: float | None = None
        # (name, size, mtime_ns) -> family: a rescan reads only headers it has not read before.
        self._families: dict[tuple[str, int, float], str] = {}
        self.refresh()

    @classmethod
    def from_config(cls, config, families: Iterable[str] | None = None) -> "LoraRegistry":
        """From a `deployments.config.LoraConfig` whose `dir`, if relative, is already resolved."""
        return cls(config.dir, config.hub, config.max_per_request, families)

    def refresh(self) -> None:
        """Rescan the directory if it changed since the last scan."""
        if self.directory is None:
            return
        try:
            mtime = os.stat(self.directory).st_mtime
        except OSError:
            mtime = None
        if mtime == self._scanned_mtime and (mtime is not None or not self._files):
            return
        self._files = self._scan() if mtime is not None else {}
        self._scanned_mtime = mtime

    def _scan(self) -> dict[str, LoraEntry]:
        found: dict[str, LoraEntry] = {}
        with os.scandir(self.directory) as entries:
            for entry in sorted(entries, key=lambda entry: entry.name):
                name, suffix = entry.name[: -len(SUFFIX)], entry.name[-len(SUFFIX):]
                if suffix != SUFFIX or not name:
                    continue
                problem = lora_name_problem(name)
                if problem is not None or name in self._hub:
                    logger.warning("LoRA file %r not listed: its name %s", entry.name, problem or "is a hub entry's")
                    continue
                if not directly_inside(self.directory, entry.path):
                    logger.warning("LoRA file %r not listed: it leads outside %s", entry.name, self.directory)
                    continue
                family, revision = self._family_of(entry)
                if family is not None:
                    found[name] = LoraEntry(name, family, "dir", self.directory, entry.name, revision)
        return found

    def _family_of(self, entry: os.DirEntry) -> tuple[str | None, str]:
        stat = os.stat(entry.path)
        key = (entry.name, stat.st_size, stat.st_mtime_ns)
        if key not in self._families:
            try:
                self._families[key] = detect_family(entry.path, self._family_names)
            except Exception as error:  # a truncated or foreign file: not an adapter anyone can use
                logger.warning("LoRA file %r not listed: unreadable safetensors header (%s)", entry.name, error)
                return None, ""
        # A file replaced under the same name (write elsewhere, then rename) gets a new revision,
        # so generators load it afresh instead of reusing the cached old one.
        return self._families[key], f"{stat.st_size}-{stat.st_mtime_ns}"

    def entries(self) -> list[LoraEntry]:
        self.refresh()
        merged = {**self._files, **self._hub}
        return [merged[name] for name in sorted(merged)]

    def names(self, family: str | None = None) -> list[str]:
        return [entry.name for entry in self.entries() if family is None or entry.family == family]

    def resolve(self, name: str) -> LoraEntry:
        """The entry called `name`. Raises LoraNameError, without touching the file system for a
        malformed name, and with one `stat` of the directory (a rescan if it changed) otherwise."""
        problem = lora_name_problem(name)
        if problem is not None:
            raise LoraNameError(f"LoRA name {problem}; got {name!r}", "a name listed by GET /v1/loras")
        entry = self._hub.get(name)
        if entry is None:
            self.refresh()
            entry = self._files.get(name)
        if entry is None:
            known = self.names()
            raise LoraNameError(f"unknown LoRA {name!r}", _one_of(known) if known else "none are configured")
        return entry

    def public(self, models_by_family: dict[str, list[str]] | None = None) -> dict:
        """`GET /v1/loras`: every adapter, and the names grouped by family with the models taking them."""
        entries = self.entries()
        models_by_family = models_by_family or {}
        families = {}
        for family in sorted({entry.family for entry in entries} | set(models_by_family)):
            families[family] = {
                "models": models_by_family.get(family, []),
                "loras": [entry.name for entry in entries if entry.family == family],
            }
        return {
            "loras": [
                {**entry.public(), "models": models_by_family.get(entry.family, [])} for entry in entries
            ],
            "families": families,
            "max_per_request": self.max_per_request,
        }


def _one_of(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return "one of " + shown + (f" and {len(names) - limit} more (GET /v1/loras)" if len(names) > limit else "")
