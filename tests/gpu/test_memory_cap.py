"""On a real CUDA device, a replica's memory cap stops it at its share of the card."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

# In a child process: the cap is process-wide and would outlive the test in this one.
_SCRIPT = """
import torch
from deployments.config import DeviceOptions
from deployments.runtime.loading import resolve_placement

placement = resolve_placement(DeviceOptions(device="cuda", memory_fraction=0.1))
assert placement.memory_fraction == 0.1, placement
total = torch.cuda.get_device_properties(0).total_memory
inside = torch.empty(int(total * 0.05), dtype=torch.uint8, device="cuda")  # half the share: fits
try:
    torch.empty(int(total * 0.1), dtype=torch.uint8, device="cuda")  # the share again: over the cap
except torch.OutOfMemoryError:
    print("capped")
"""


def test_memory_fraction_caps_cuda_allocations():
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "capped", result.stdout + result.stderr
