"""HPSv2.1 (xswu/HPSv2, `HPS_v2.1_compressed.pt`, Apache-2.0): an OpenCLIP ViT-H-14 fine-tuned on
HPD v2's human preferences.

The checkpoint is an OpenCLIP state dict; `deployments.scoring.openclip` converts it to a
transformers `CLIPModel` of the architecture kept in `deployments/architectures/` (every key and
shape checked first), since open-clip-torch cannot be installed here. `hps` is HPSv2's own score:
cosine(image, prompt) of the fine-tuned tower, clipped at 0 (range 0-1; about 0.2-0.35 for real
images). Tokenizer and image processor: OpenCLIP ViT-H-14's (`options.processor`).

`source`: a hub repo id holding `options.filename`, a local folder holding it, or the file itself
(.pt/.pth read with torch.load(weights_only=True), or .safetensors). `tiny`: a tiny tower written
in OpenCLIP's layout and loaded back through the same conversion, so the dev profile and the tests
run the real path.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from deployments.config import TINY, ScorerEntry
from deployments.scoring.families.base import ClipTower, processor_parts
from deployments.scoring.families.preference import PreferenceFamily, PreferenceOptions

TINY_SEED = 1


class Options(PreferenceOptions):
    filename: str = Field("HPS_v2.1_compressed.pt", min_length=1,
                          description="The checkpoint inside a repo id or folder source (ignored for a file source).")
    architecture: str = Field("hpsv2.1-vit-h-14", min_length=1,
                              description="The checkpoint's OpenCLIP architecture: a name in deployments/architectures/ "
                                          "or a local JSON file with its `config` (OpenCLIP's model config).")

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        from deployments.config import is_local_path
        from deployments.scoring.openclip import ARCHITECTURES

        if not is_local_path(value) and not (ARCHITECTURES / f"{value}.json").is_file():
            known = sorted(path.stem for path in ARCHITECTURES.glob("*.json"))
            raise ValueError(f"architecture {value!r} is not in deployments/architectures ({known}) nor a local path")
        return value


def tiny_openclip_config(vocab_size: int) -> dict:
    """A tiny OpenCLIP model config of ViT-H-14's shape (GELU, 77 text positions)."""
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 32, "heads": 4, "layers": 2}}


def build_tiny_checkpoint(seed: int = TINY_SEED) -> tuple[dict, dict]:
    """(OpenCLIP config, an OpenCLIP-layout state dict with tiny random weights)."""
    from transformers import CLIPModel

    from deployments.runtime.tiny import seeded, tiny_clip_tokenizer
    from deployments.scoring.openclip import clip_config, to_openclip

    tokenizer = tiny_clip_tokenizer()
    config = tiny_openclip_config(len(tokenizer))
    rng = seeded(seed)
    try:
        model = CLIPModel(clip_config(config, tokenizer))
    finally:
        rng.__exit__(None, None, None)
    return config, to_openclip(model.state_dict())


def checkpoint_path(options: Options, source: str) -> Path:
    from deployments.config import is_local_path, local_path

    if is_local_path(source):
        path = local_path(source)
        path = path / options.filename if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"HPS checkpoint {str(path)!r} does not exist on this node")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=source, filename=options.filename))


class HpsFamily(PreferenceFamily):
    name = "hps"
    metric = "hps"
    description = "HPSv2.1: human preference (HPD v2), cosine of a fine-tuned OpenCLIP ViT-H-14"
    licence = "Apache-2.0 (xswu/HPSv2)"
    Options = Options

    def weight_sources(self, entry: ScorerEntry) -> list:
        from deployments.runtime.weights import WeightSource

        options = self.options_of(entry)
        return [WeightSource("HPSv2.1", entry.source, "file", filename=options.filename),
                WeightSource("HPSv2.1 processor", options.processor, "processor")][:1 if entry.source == TINY else 2]

    def save_tiny(self, folder: Path, seed: int = TINY_SEED) -> None:
        """The checkpoint as HPSv2 saves it, its architecture and the processor, in one folder: load it
        with `source: <folder>`, `options: {processor: <folder>, architecture: <folder>/architecture.json}`."""
        import json

        import torch

        from deployments.runtime.tiny import build_tiny_clip

        config, state = build_tiny_checkpoint(seed)
        torch.save({"state_dict": state}, folder / self.Options().filename)
        (folder / "architecture.json").write_text(json.dumps({"config": config}))
        for name in ("tokenizer", "image_processor"):
            build_tiny_clip()[name].save_pretrained(folder)

    def tower(self, entry: ScorerEntry, placement) -> ClipTower:
        from deployments.runtime.loading import is_tiny, pretrained_location
        from deployments.scoring.openclip import architecture, clip_config, load_openclip_model, read_checkpoint

        options = self.options_of(entry)
        if is_tiny(entry.source):
            from deployments.runtime.tiny import build_tiny_clip

            config, state = build_tiny_checkpoint()
            parts = build_tiny_clip()  # its tokenizer and image processor (the weights come from `state`)
            parts.pop("model")
            origin = "the tiny HPS checkpoint"
        else:
            config = architecture(options.architecture)["config"]
            parts = processor_parts(pretrained_location(options.processor))
            path = checkpoint_path(options, entry.source)
            state, origin = read_checkpoint(path), str(path)
        model = load_openclip_model(state, clip_config(config, parts["tokenizer"]), origin, dtype=placement.dtype)
        return ClipTower(model, parts["tokenizer"], parts["image_processor"], placement)


FAMILY = HpsFamily()
