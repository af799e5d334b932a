"""The simulated cards, as data: `sim_profiles.yaml` beside this module, one entry per card."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

PROFILES_FILE = Path(__file__).with_name("sim_profiles.yaml")
PREFIX = "sim:"


@dataclass(frozen=True)
class Profile:
    """One card's vendor figures (dense, no sparsity) and where they come from."""

    key: str
    name: str
    memory_gb: float
    bf16_tflops: float
    fp8_tflops: float | None
    memory_bandwidth_gbs: float
    host_to_device_gbs: float
    disk_read_gbs: float  # the node's storage at a cold start (an assumption: sim_profiles.yaml says whose)
    sources: dict
    device_names: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def peak_flops(self, fp8: bool) -> float:
        """FLOP/s of the tensor cores in bf16, or fp8 where asked (the caller checked the card has it)."""
        return (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12


@cache
def profiles() -> dict[str, Profile]:
    import yaml

    data = yaml.safe_load(PROFILES_FILE.read_text())
    return {key: Profile(key=key, **{**entry, "device_names": tuple(entry.get("device_names", ()))})
            for key, entry in data.items()}


def profile(key: str) -> Profile:
    """The profile `key`; ValueError naming the known ones otherwise."""
    known = profiles()
    if key not in known:
        raise ValueError(f"unknown simulated device profile {key!r}; known: {', '.join(known)}")
    return known[key]


def profile_of_device(name: str) -> Profile | None:
    """The profile of a real card, by the name torch.cuda.get_device_name() reports; None if none is."""
    return next((card for card in profiles().values() if name in card.device_names), None)


def simulated_profile(device: str) -> str | None:
    """The profile name of a `sim:<profile>` device string, None for any other device."""
    return device[len(PREFIX):] if device.startswith(PREFIX) else None
