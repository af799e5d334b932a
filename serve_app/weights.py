"""`genserve download` and the weights check of `genserve doctor`: what a config needs from the hub.

`plan(args)` lists, offline, every hub source a config names (image models, enabled or optional,
with their ControlNets and depth estimator, the CLIP scorer and its LAION head, the enhancer's
LLM, hub LoRAs, the video models), with the variant each will load. `resolve` lists a repo on the
hub and picks exactly the files loading reads (`deployments.runtime.weights.select_files`);
`download` fetches them with huggingface_hub's own `snapshot_download` into the Hugging Face
cache (or `cache_dir`), so `HF_HUB_OFFLINE=1 genserve serve CONFIG` then finds them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from deployments.runtime.weights import WeightSource, pipeline_components, select_files
from deployments.scoring.families import get_scorer_family
from serve_app.config import AppArgs


@dataclass(frozen=True)
class PlannedRepo:
    """One hub repo to fetch, the roles it serves, and whether only optional (`enabled: false`)
    entries use it."""

    source: WeightSource
    roles: tuple[str, ...]
    optional: bool


@dataclass
class ResolvedRepo:
    planned: PlannedRepo
    files: dict[str, int | None] = field(default_factory=dict)  # path -> size in bytes (None: unknown)
    error: str | None = None

    @property
    def size(self) -> int:
        return sum(size or 0 for size in self.files.values())


def weight_sources(args: AppArgs) -> list[tuple[WeightSource, bool]]:
    """Every (weights, optional) the config names, hub ids, folders and 'tiny' alike."""
    # A model on a simulated device loads no weights (docs/simulator.md): nothing to fetch for it.
    found: list[tuple[WeightSource, bool]] = []
    for entry in args.image_models:
        if entry.device.simulated is None:
            found += [(source, not entry.enabled) for source in entry.model_family.weight_sources(entry)]
    for entry in args.scorers:
        if entry.device.simulated is None:
            family = get_scorer_family(entry.family)
            found += [(source, not entry.enabled) for source in family.weight_sources(entry)]
    llm = args.enhancer.llm
    if args.enhancer.mode == "llm" and llm.backend == "transformers" and llm.device.simulated is None:
        found.append((WeightSource("prompt enhancer LLM", llm.source, "transformers"), False))
    found += [(WeightSource(f"LoRA {lora.name}", lora.repo, "file", filename=lora.weight_name), False)
              for lora in args.loras.hub]
    for entry in args.video_models:
        found += [(source, not entry.enabled) for source in entry.model_family.weight_sources(entry)]
    return found


def plan(args: AppArgs) -> list[PlannedRepo]:
    """The hub repos to fetch, one per (repo, layout, variant, file), in config order; offline."""
    merged: dict[tuple, list] = {}
    for source, optional in weight_sources(args):
        if not source.is_hub:
            continue
        key = (source.source, source.layout, source.variant, source.filename)
        roles, was_optional, first = merged.get(key, ([], True, source))
        merged[key] = [[*roles, source.role], was_optional and optional, first]
    return [PlannedRepo(source, tuple(roles), optional) for roles, optional, source in merged.values()]


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()  # HF_TOKEN, or the token `hf auth login` saved


def gated_message(repo: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    have = "the token in the environment has no access" if _token() else "no token is set"
    return (f"{repo} is gated and {have}: accept its terms at {endpoint}/{repo}, then set HF_TOKEN "
            "(a read token from your hub account's settings) and run this again")


def resolve(planned: PlannedRepo, api=None) -> ResolvedRepo:
    """List the repo on the hub and pick the files loading reads, with their sizes."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    api = api or HfApi(token=_token())
    source = planned.source
    resolved = ResolvedRepo(planned)
    try:
        listing = {entry.path: entry.size for entry in api.list_repo_tree(source.source, recursive=True)
                   if isinstance(entry, RepoFile)}
        components = None
        if source.layout == "diffusers-pipeline":
            if "model_index.json" not in listing:
                raise ValueError(f"{source.source} has no model_index.json: not a diffusers pipeline")
            index_path = hf_hub_download(source.source, "model_index.json", token=api.token)
            with open(index_path) as handle:
                components = pipeline_components(json.load(handle))
        chosen = select_files(listing, source.layout, source.variant, components, source.filename)
        if not chosen:
            raise ValueError(f"{source.source} has none of the files {source.layout} loading reads"
                             + (f" ({source.filename})" if source.filename else "") + " as safetensors")
        resolved.files = {path: listing[path] for path in chosen}
    except GatedRepoError:
        resolved.error = gated_message(source.source)
    except RepositoryNotFoundError:
        resolved.error = f"{source.source} does not exist on the hub (or is private and the token cannot see it)"
    except (HfHubHTTPError, OSError, ValueError) as error:
        resolved.error = f"{source.source}: {error}"
    return resolved


def download(resolved: ResolvedRepo, cache_dir: str | None = None) -> str:
    """Fetch exactly the resolved files (huggingface_hub shows a progress bar); return the snapshot folder."""
    from huggingface_hub import snapshot_download

    return snapshot_download(resolved.planned.source.source, allow_patterns=sorted(resolved.files),
                             cache_dir=cache_dir, token=_token())


def is_cached(planned: PlannedRepo, cache_dir: str | None = None) -> str | None:
    """None when the repo's snapshot is in the cache with its planned variant/file; else what is missing."""
    from huggingface_hub import try_to_load_from_cache

    source = planned.source
    probe = {"diffusers-pipeline": "model_index.json", "diffusers-model": "config.json",
             "transformers": "config.json", "processor": "tokenizer_config.json",
             "file": source.filename}[source.layout]
    found = try_to_load_from_cache(source.source, probe, cache_dir=cache_dir)
    if not isinstance(found, str):
        return f"{source.source} is not in the Hugging Face cache"
    from deployments.runtime.weights import local_variant

    if source.variant and local_variant(source.source, source.variant) is None:
        return f"{source.source} is cached without its {source.variant} weights"
    return None


def human_size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    raise AssertionError


def describe(planned: PlannedRepo) -> str:
    source = planned.source
    what = source.filename or (f"{source.layout}, variant {source.variant}" if source.variant else source.layout)
    return f"{source.source} [{what}] for {', '.join(planned.roles)}" + (" (optional entry)" if planned.optional else "")


def run_download(args: AppArgs, *, dry_run: bool, cache_dir: str | None, include_optional: bool,
                 out=sys.stdout) -> int:
    """`genserve download`: print the plan, fetch it (unless dry_run), print a size summary."""
    from huggingface_hub import constants

    repos = [repo for repo in plan(args) if include_optional or not repo.optional]
    if not repos:
        print("genserve: this config names no hub weights (tiny models or local folders only); nothing to fetch",
              file=out)
        return 0
    if constants.HF_HUB_OFFLINE:
        print("genserve: HF_HUB_OFFLINE is set, so the hub cannot be listed; the plan is:", file=out)
        for repo in repos:
            print(f"  {describe(repo)}", file=out)
        return 0 if dry_run else 2
    failures, total = [], 0
    for repo in repos:
        resolved = resolve(repo)
        print(f"{describe(repo)}", file=out)
        if resolved.error:
            print(f"  ERROR: {resolved.error}", file=out)
            failures.append(resolved)
            continue
        for path, size in resolved.files.items():
            print(f"  {path}  {human_size(size)}", file=out)
        print(f"  {len(resolved.files)} files, {human_size(resolved.size)}", file=out, flush=True)
        total += resolved.size
        if not dry_run:
            folder = download(resolved, cache_dir)
            print(f"  -> {folder}", file=out, flush=True)
    done = len(repos) - len(failures)
    verb = "to fetch" if dry_run else "fetched"
    print(f"genserve: {done} of {len(repos)} repos {verb}, {human_size(total)} in all", file=out)
    if cache_dir and not dry_run:
        print(f"genserve: serve with HF_HUB_CACHE={os.path.abspath(cache_dir)} (and HF_HUB_OFFLINE=1 to stay "
              "offline) so loading finds them", file=out)
    for failed in failures:
        print(f"genserve: not fetched: {failed.error}", file=out)
    return 1 if failures else 0
