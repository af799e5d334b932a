"""Per-replica metrics of a model deployment, through `ray.serve.metrics`.

Created once in a replica's constructor; recording only touches in-memory counters and
histograms (Ray exports them on its metrics port in the background). Ray prefixes every custom
metric with `ray_`, so `genserve_model_errors_total` is scraped as `ray_genserve_model_errors_total`.
Serve adds the `deployment`, `replica` and `application` tags itself.

Accelerator memory is recorded only where the model runs on CUDA: on a CPU the series are absent,
not zero.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from deployments.runtime.progress import Interrupted
from deployments.runtime.types import ModelOutOfMemory

# Bytes: 256 MiB .. 128 GiB, doubling.
MEMORY_BUCKETS = [float(2**power) for power in range(28, 38)]


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def free_accelerator_memory(cuda: bool) -> None:
    """After an out-of-memory error: drop what the failed call left (its tensors are unreachable
    once the exception is handled) and hand cached blocks back, so the next request starts clean."""
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


class ModelMetrics:
    def __init__(self, model: str, device: str, enabled: bool = True):
        self._model = model
        self._cuda = device == "cuda"
        self._enabled = enabled
        self._replica_peak = 0
        if not enabled:
            return
        from ray.serve import metrics

        self._errors = metrics.Counter(
            "genserve_model_errors_total",
            description="Model calls that raised, by exception kind.",
            tag_keys=("model", "kind"),
        )
        self._errors.set_default_tags({"model": model})
        self._request_peak = metrics.Histogram(
            "genserve_request_peak_accelerator_memory_bytes",
            description="Peak accelerator memory allocated during one model call (CUDA only).",
            boundaries=MEMORY_BUCKETS,
            tag_keys=("model",),
        )
        self._request_peak.set_default_tags({"model": model})
        self._replica_peak_gauge = metrics.Gauge(
            "genserve_replica_peak_accelerator_memory_bytes",
            description="Peak accelerator memory allocated by this replica since it started (CUDA only).",
            tag_keys=("model",),
        )
        self._replica_peak_gauge.set_default_tags({"model": model})
        self._cold_start = metrics.Gauge(
            "genserve_model_cold_start_seconds",
            description="Seconds from a replica's start of loading its model to ready: load, acceleration and "
                        "warm-up calls (compilation included).",
            tag_keys=("model",),
        )
        self._cold_start.set_default_tags({"model": model})

    def record_cold_start(self, seconds: float) -> None:
        if self._enabled:
            self._cold_start.set(seconds)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Around one model call: count a raised exception by kind; on CUDA record peak memory.
        Out of accelerator memory: free the cache and raise `ModelOutOfMemory` (the replica serves on).

        Calls are serialised per replica, so the peak since the reset belongs to this call.
        """
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        except Interrupted:
            raise  # a cancelled request stopping at a step end, not a model error
        except Exception as error:
            if self._enabled:
                self._errors.inc(tags={"kind": type(error).__name__})  # OutOfMemoryError included
            if _is_out_of_memory(error):
                free_accelerator_memory(self._cuda)
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise ModelOutOfMemory(self._model, first_line[:300]) from None
            raise
        if self._cuda and self._enabled:
            import torch

            peak = torch.cuda.max_memory_allocated()
            self._request_peak.observe(peak)
            self._replica_peak = max(self._replica_peak, peak)
            self._replica_peak_gauge.set(self._replica_peak)
