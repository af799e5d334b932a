"""Per-replica metrics of a model deployment, through `ray.serve.metrics`.

Created once in a replica's constructor; recording only touches in-memory counters and
histograms (Ray exports them on its metrics port in the background). Ray prefixes every custom
metric with `ray_`, so `genserve_model_errors_total` is scraped as `ray_genserve_model_errors_total`.
Serve adds the `deployment`, `replica` and `application` tags itself.

Accelerator memory is recorded only where the model runs on CUDA: on a CPU the series are absent,
not zero.

Device busy time is recorded on every device: the seconds a replica spends inside its model calls
(`genserve_model_busy_seconds_total`), and the CPU its process spent meanwhile
(`genserve_model_call_cpu_seconds_total`). The same totals are kept in memory (`DeviceClock`) and
read through the deployment's `device_time()` method, which `genserve bench` calls before and after
each level: utilization is busy time over wall time, and the call's CPU is what the benchmark
subtracts from the Ray processes' CPU to get the CPU spent outside the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import Iterator

from deployments.runtime.progress import Interrupted
from deployments.runtime.types import ModelOutOfMemory

# Bytes: 256 MiB .. 128 GiB, doubling.
MEMORY_BUCKETS = [float(2**power) for power in range(28, 38)]
# A move of a model's weights over PCIe: from tens of milliseconds (a small model, pinned) to tens of
# seconds (a large one from pageable memory).
MOVE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]


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


@dataclasses.dataclass
class DeviceClock:
    """Totals of one replica's model calls since it started. Calls are serialised per replica (a lock,
    or one batch at a time), so busy seconds never overlap and busy over wall time is at most 1.

    `cpu_s` is the replica process's CPU time during the calls (`time.process_time`, all threads):
    torch's intra-op threads included, and also whatever else the replica did meanwhile (receiving
    the next request), which is small next to a call."""

    busy_s: float = 0.0
    cpu_s: float = 0.0
    calls: int = 0

    def add(self, busy_s: float, cpu_s: float) -> None:
        self.busy_s += busy_s
        self.cpu_s += cpu_s
        self.calls += 1


class BusyMeter:
    """The device's share of a call that also does CPU work (a scorer resizes its images first):
    the union of the intervals in which at least one forward pass runs, so two threads' passes that
    overlap (a prompt's text pass beside the image pass) count once, and the process's CPU time over
    those intervals. `ModelMetrics.track(meter)` records these instead of the whole call's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open = 0
        self._since = self._cpu_since = 0.0
        self._busy_s = self._cpu_s = 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around one forward pass (on CUDA, synchronised before it ends: the kernels are its time)."""
        with self._lock:
            if self._open == 0:
                self._since, self._cpu_since = time.perf_counter(), time.process_time()
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                if self._open == 0:
                    self._busy_s += time.perf_counter() - self._since
                    self._cpu_s += time.process_time() - self._cpu_since

    def take(self) -> tuple[float, float]:
        """(busy seconds, CPU seconds) since the last take: with calls at once, what all of them ran."""
        with self._lock:
            taken = self._busy_s, self._cpu_s
            self._busy_s = self._cpu_s = 0.0
            return taken


def replica_id() -> str:
    """This Serve replica's unique id, or "local" outside Serve (tests, in-process benchmarks)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a Serve replica
        return "local"


class ModelMetrics:
    def __init__(self, model: str, device: str, enabled: bool = True):
        self._model = model
        self._cuda = device == "cuda"
        self._enabled = enabled
        self._replica_peak = 0
        self._cold_start_s: float | None = None
        self.clock = DeviceClock()
        self._resident_now: int | None = None
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
        self._busy = metrics.Counter(
            "genserve_model_busy_seconds_total",
            description="Seconds spent inside model calls (the device busy): over wall time, the replica's utilization.",
            tag_keys=("model",),
        )
        self._busy.set_default_tags({"model": model})
        self._call_cpu = metrics.Counter(
            "genserve_model_call_cpu_seconds_total",
            description="CPU seconds of the replica's process during its model calls.",
            tag_keys=("model",),
        )
        self._call_cpu.set_default_tags({"model": model})
        self._moves = metrics.Histogram(
            "genserve_model_move_seconds",
            description="Seconds of each move of an on-demand model between host RAM and the GPU, by direction "
                        "(in, out): the count is the moves.",
            boundaries=MOVE_BUCKETS,
            tag_keys=("model", "direction"),
        )
        self._moves.set_default_tags({"model": model})
        self._resident = metrics.Gauge(
            "genserve_model_resident",
            description="1 while an on-demand model is on the GPU, 0 while it waits in host RAM.",
            tag_keys=("model",),
        )
        self._resident.set_default_tags({"model": model})

    def record_move(self, direction: str, seconds: float) -> None:
        """An on-demand model moved `in` to the GPU or `out` to host RAM (deployments.runtime.residency)."""
        self._resident_now = 1 if direction == "in" else 0
        if self._enabled:
            self._moves.observe(seconds, tags={"direction": direction})
            self._resident.set(self._resident_now)

    def device_time(self) -> dict:
        """This replica's model-call totals, as `genserve bench` reads them (see `DeviceClock`)."""
        return {"replica": replica_id(), "model": self._model, "pid": os.getpid(),
                **dataclasses.asdict(self.clock)}

    def _record_call(self, busy_s: float, cpu_s: float) -> None:
        self.clock.add(busy_s, cpu_s)
        # A metered call can add nothing: two calls at once share the replica's meter, and the first
        # to end takes the passes of both. Ray's counters refuse an increment of 0.
        if self._enabled and busy_s > 0:
            self._busy.inc(busy_s)
        if self._enabled and cpu_s > 0:
            self._call_cpu.inc(cpu_s)

    def record_cold_start(self, seconds: float) -> None:
        self._cold_start_s = seconds
        self.refresh()

    def refresh(self) -> None:
        """Record the gauges that are set once again (the replica's health check calls this every
        period): Ray's metrics agent drops a series that was not recorded for about half a minute
        (measured on Ray 2.60), so a gauge set only at start would vanish from the scrape."""
        if not self._enabled:
            return
        if self._cold_start_s is not None:
            self._cold_start.set(self._cold_start_s)
        if self._resident_now is not None:
            self._resident.set(self._resident_now)
        if self._cuda and self._replica_peak:
            self._replica_peak_gauge.set(self._replica_peak)

    @contextlib.contextmanager
    def track(self, meter: BusyMeter | None = None) -> Iterator[None]:
        """Around one model call: count a raised exception by kind; on CUDA record peak memory.
        Out of accelerator memory: free the cache and raise `ModelOutOfMemory` (the replica serves on).

        Calls are serialised per replica, so the peak since the reset belongs to this call. Every
        call's time counts as busy, a failed or cancelled one too: the device was held. With a
        `meter`, only its forward passes count (the call's CPU work before them is not device time).
        """
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        started, cpu_started = time.perf_counter(), time.process_time()
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
        finally:
            if meter is None:
                self._record_call(time.perf_counter() - started, time.process_time() - cpu_started)
            else:
                self._record_call(*meter.take())
        if self._cuda and self._enabled:
            import torch

            peak = torch.cuda.max_memory_allocated()
            self._request_peak.observe(peak)
            self._replica_peak = max(self._replica_peak, peak)
            self._replica_peak_gauge.set(self._replica_peak)
