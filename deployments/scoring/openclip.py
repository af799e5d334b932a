"""OpenCLIP checkpoints as transformers `CLIPModel`s: the key and shape mapping, both ways.

HPSv2.1 ships as an OpenCLIP ViT-H-14 state dict (`HPS_v2.1_compressed.pt`). `open-clip-torch`
needs torchvision and timm, which do not install beside the CPU torch here, so the checkpoint is
converted at load instead: OpenCLIP's `VisionTransformer`/`TextTransformer` and transformers'
`CLIPModel` are the same network (pre-norm blocks, GELU MLPs, a class token, eos pooling of the
text, bias-free projections), with the attention's fused `in_proj` split into q, k, v and the
projections stored transposed. The architecture (`config`) is an OpenCLIP model config as
OpenCLIP's `model_configs/*.json` writes it; `deployments/architectures/hpsv2.1-vit-h-14.json` holds
ViT-H-14's, with every key and shape of the published checkpoint, for the conversion test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ARCHITECTURES = Path(__file__).resolve().parent.parent / "architectures"
_BLOCK = {  # per resblock: OpenCLIP name -> transformers name (in_proj is split apart)
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def architecture(name: str) -> dict:
    """A published architecture kept as data (`deployments/architectures/<name>.json`), or a JSON file
    of the same shape on this node (a path: a fine-tune of another OpenCLIP architecture)."""
    from deployments.config import is_local_path, local_path

    path = local_path(name) if is_local_path(name) else ARCHITECTURES / f"{name}.json"
    return json.loads(path.read_text())


def clip_config(config: dict, tokenizer=None):
    """The transformers `CLIPConfig` of an OpenCLIP model config (`embed_dim`, `vision_cfg`, `text_cfg`).

    `tokenizer`: its bos/eos/pad ids go into the text config (CLIP's BPE when None: 49406/49407)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    ids = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    text_config = CLIPTextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"], num_attention_heads=text["heads"],
        intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)), num_hidden_layers=text["layers"],
        max_position_embeddings=text["context_length"], hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=config["embed_dim"], **ids,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision["width"], num_attention_heads=vision["width"] // vision.get("head_width", 64),
        intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4.0)), num_hidden_layers=vision["layers"],
        image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act, layer_norm_eps=1e-5,
        projection_dim=config["embed_dim"],
    )
    return CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                      projection_dim=config["embed_dim"])


def unwrap(checkpoint: dict) -> dict:
    """The state dict inside a training checkpoint (`{'state_dict': ...}`, DDP's `module.` prefix off)."""
    state = checkpoint.get("state_dict", checkpoint)
    return {key.removeprefix("module."): value for key, value in state.items()}


def _tower(prefix: str) -> tuple[str, str]:
    """(OpenCLIP's, transformers') prefix of a tower's blocks."""
    return (("visual.transformer.resblocks.", "vision_model.encoder.layers.") if prefix == "visual"
            else ("transformer.resblocks.", "text_model.encoder.layers."))


def _convert_block(key: str, value, tower: str, out: dict) -> bool:
    source, target = _tower(tower)
    if not key.startswith(source):
        return False
    index, _, rest = key[len(source):].partition(".")
    base = f"{target}{index}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
            out[f"{base}self_attn.{name}_proj.{kind}"] = part
        return True
    module, _, kind = rest.rpartition(".")
    if module not in _BLOCK:
        raise KeyError(f"unexpected OpenCLIP block key {key!r}")
    out[f"{base}{_BLOCK[module]}.{kind}"] = value
    return True


_DIRECT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def to_transformers(state: dict) -> dict:
    """An OpenCLIP CLIP state dict as a transformers `CLIPModel` one (the same tensors, renamed,
    in_proj split, projections transposed). Unknown keys are an error: a checkpoint of another
    architecture must not load half-way."""
    out: dict = {}
    for key, value in state.items():
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T
        elif not (_convert_block(key, value, "visual", out) or _convert_block(key, value, "text", out)):
            raise KeyError(f"unexpected OpenCLIP key {key!r}: not a CLIP ViT checkpoint")
    return out


def to_openclip(state: dict) -> dict:
    """The inverse of `to_transformers` (tests, and the tiny HPS checkpoint written in OpenCLIP's layout)."""
    import torch

    inverse = {target: source for source, target in _DIRECT.items()}
    out: dict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer of transformers' embeddings, not a weight
        if key in inverse:
            out[inverse[key]] = value
        elif key in {target: source for source, target in _TRANSPOSED.items()}:
            out[{target: source for source, target in _TRANSPOSED.items()}[key]] = value.T
        else:
            out.update(_block_to_openclip(key, value, state, torch))
    return out


def _block_to_openclip(key: str, value, state: dict, torch) -> dict:
    for tower in ("visual", "text"):
        source, target = _tower(tower)
        if not key.startswith(target):
            continue
        index, _, rest = key[len(target):].partition(".")
        base = f"{source}{index}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            if not rest.startswith("self_attn.q_proj"):
                return {}  # written with q
            kind = rest.rsplit(".", 1)[1]
            parts = [state[f"{target}{index}.self_attn.{name}_proj.{kind}"] for name in ("q", "k", "v")]
            return {f"{base}attn.in_proj_{kind}": torch.cat(parts, dim=0)}
        module, _, kind = rest.rpartition(".")
        inverse = {target_name: source_name for source_name, target_name in _BLOCK.items()}
        return {f"{base}{inverse[module]}.{kind}": value}
    raise KeyError(f"unexpected CLIPModel key {key!r}")


def expected_layout(config) -> dict[str, tuple[int, ...]]:
    """Every weight of a `CLIPModel` of `config` with its shape, from a model on the meta device (no memory)."""
    import torch
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = CLIPModel(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if not key.endswith("position_ids")}


def converted_checked(state: dict, config, origin: str) -> dict:
    """An OpenCLIP state dict converted for a `CLIPModel` of `config`; every key and shape must match."""
    converted = to_transformers(unwrap(state))
    expected = expected_layout(config)
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    wrong = [(key, tuple(converted[key].shape), expected[key]) for key in sorted(set(expected) & set(converted))
             if tuple(converted[key].shape) != expected[key]]
    if missing or unexpected or wrong:
        raise ValueError(f"{origin} does not fit the architecture: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}, wrong shapes (key, got, expected) {wrong[:4]}")
    return converted


def load_openclip_model(state: dict, config, origin: str, dtype=None):
    """A transformers `CLIPModel` holding an OpenCLIP checkpoint's weights (checked, then loaded by
    `from_pretrained`, which builds the model on the meta device and assigns the tensors)."""
    from transformers import CLIPModel

    converted = converted_checked(state, config, origin)
    return CLIPModel.from_pretrained(None, config=config, state_dict=converted, dtype=dtype)


def read_checkpoint(path: Path) -> dict[str, "torch.Tensor"]:
    """Tensors only: safetensors, or a torch checkpoint loaded with weights_only=True (no pickled code runs)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return unwrap(torch.load(str(path), map_location="cpu", weights_only=True))
