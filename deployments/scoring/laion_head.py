"""The LAION improved-aesthetic-predictor head: an MLP from a CLIP image embedding to a 1-10 rating.

The public head (christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`)
is a state dict of

    layers = Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                        Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))

(no activations: it was trained with MSE on the average human rating), fed L2-normalised CLIP
ViT-L/14 image embeddings. Its keys are `layers.{0,2,4,6,7}.{weight,bias}`. The widths are read
from the weights, so a head of the same layout over another CLIP width (the tiny one) loads the
same way; the embedding width must match the CLIP model's.

Weights are read as safetensors, or as a `.pth`/`.pt` state dict with `torch.load(weights_only=True)`,
which loads tensors only and never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from deployments.config import TINY, LaionHeadConfig, is_local_path, local_path
from deployments.names import SCORE_RANGES

if TYPE_CHECKING:
    import torch

LINEAR_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in the public Sequential
DROPOUTS = (0.2, 0.2, 0.1)
LAION_RANGE = SCORE_RANGES["laion"]


def build_head(widths: list[int]) -> "torch.nn.Module":
    """The public layout with the given widths: [embedding, 1024, 128, 64, 16, 1] for the real head."""
    from torch import nn

    if len(widths) != len(LINEAR_INDICES) + 1 or widths[-1] != 1:
        raise ValueError(f"a LAION head has 5 linear layers ending in one output; got widths {widths}")
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(DROPOUTS):
            layers.append(nn.Dropout(DROPOUTS[index]))
    return nn.Sequential(*layers).eval()


def build_tiny_laion_head(embedding_width: int = 32, seed: int = 0) -> "torch.nn.Module":
    """This layout with tiny random widths (tests, the dev profile; `genserve save-tiny laion`).

    The last bias is 5.5, the middle of the 1-10 range, so the random head's ratings spread around
    it instead of all being clipped to 1."""
    import torch

    from deployments.runtime.tiny import seeded

    rng = seeded(seed)
    try:
        head = build_head([embedding_width, 16, 8, 8, 4, 1])
    finally:
        rng.__exit__(None, None, None)
    with torch.no_grad():
        head[-1].bias.fill_(5.5)
    return head.eval()


def head_from_state_dict(state: dict[str, "torch.Tensor"], origin: str) -> "torch.nn.Module":
    """Check the keys and shapes of a head's weights, then build and fill the head."""
    expected = {f"layers.{index}.{kind}" for index in LINEAR_INDICES for kind in ("weight", "bias")}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{origin} is not an improved-aesthetic-predictor head: missing {missing}, unexpected {unexpected[:8]}"
        )
    weights = [state[f"layers.{index}.weight"] for index in LINEAR_INDICES]
    widths = [int(weights[0].shape[1])] + [int(weight.shape[0]) for weight in weights]
    for index, weight in zip(LINEAR_INDICES, weights):
        if weight.ndim != 2:
            raise ValueError(f"{origin}: layers.{index}.weight must be a matrix; got shape {tuple(weight.shape)}")
    for position, (index, weight) in enumerate(zip(LINEAR_INDICES, weights)):
        if int(weight.shape[1]) != widths[position]:
            raise ValueError(f"{origin}: layers.{index}.weight takes {weight.shape[1]} inputs, the layer before gives {widths[position]}")
    head = build_head(widths)
    head.load_state_dict({key.removeprefix("layers."): value.float() for key, value in state.items()})
    return head.eval()


def head_input_width(head: "torch.nn.Module") -> int:
    return int(head[0].in_features)


def weights_path(config: LaionHeadConfig, source: str) -> Path:
    """The local weights file of a file, folder or hub-id source (a hub file is downloaded, once)."""
    if is_local_path(source):
        path = local_path(source)
        if path.is_dir():
            path = path / config.filename
        if not path.is_file():
            raise FileNotFoundError(f"LAION head weights {str(path)!r} do not exist on this node")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=source, filename=config.filename))


def read_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    """Tensors only: safetensors, or a torch state dict loaded with weights_only=True."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"LAION head weights must be .safetensors, .pth or .pt; got {path.name!r}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path.name} must hold a state dict of tensors")
    return state


def load_head(config: LaionHeadConfig, source: str, embedding_width: int) -> "torch.nn.Module":
    """The head for a CLIP model whose image embeddings are `embedding_width` wide.

    A head made for another width is a config error (the public head needs CLIP ViT-L/14's 768)."""
    if source == TINY:
        head = build_tiny_laion_head(embedding_width)
        origin = "the tiny head"
    else:
        path = weights_path(config, source)
        origin = str(path)
        head = head_from_state_dict(read_state_dict(path), origin)
    width = head_input_width(head)
    if width != embedding_width:
        raise ValueError(
            f"scorer.laion: {origin} takes {width}-wide image embeddings, but the CLIP model gives "
            f"{embedding_width}-wide ones; use a head trained for this CLIP model (the public head "
            "needs CLIP ViT-L/14, 768), or set scorer.laion.enabled: false"
        )
    return head


def save_head(head: "torch.nn.Module", path: str | Path) -> Path:
    """Write a head as safetensors (what tests and `genserve save-tiny laion` use)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keys as the public file has them (`layers.N.*`: its Sequential was an attribute `layers`).
    save_file({f"layers.{key}": value.contiguous() for key, value in head.state_dict().items()}, str(path))
    return path
