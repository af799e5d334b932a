"""What both generator deployments (`image_generator.ImageGenerator`, `video_generator.VideoGenerator`)
do around their model, whatever it makes: the cold start, info and health.

A replica's constructor is its cold start, all of it before Serve sees the replica healthy:
`_load` places it on the entry's device (`resolve_placement`), creates its metrics once and loads
the family's model; the subclass then sets up what it adds over the model (LoRAs, batching); and
`_ready` runs the warm-up calls the entry's `warmup:` asks for (`_warmup_shapes`, each run by `_warm`),
so no user pays a first call or a compilation, and records the cold start: a gauge
(`genserve_model_cold_start_seconds`) that every health check records again, and part of `info()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from deployments.runtime.loading import check_device_health, resolve_placement
from deployments.runtime.metrics import ModelMetrics

logger = logging.getLogger("ray.serve")


class GeneratorBase:
    """The shared part of a generator deployment; subclasses say how an entry names its family
    (`_family_of`) and what a warm-up call is."""

    @staticmethod
    def _family_of(name: str):
        """The family named `name`, from the image or the video registry."""
        raise NotImplementedError

    def _load(self, config, metrics: bool) -> None:
        """Place the replica, create its metrics and load the family's model (timed)."""
        self._config = config
        self._family = self._family_of(config.family)
        self._placement = resolve_placement(config.device)
        self._metrics = ModelMetrics(config.id, self._placement.device, enabled=metrics)
        # The pipeline is not safe under concurrent calls: one call at a time per replica.
        self._lock = asyncio.Lock()
        self._started = time.perf_counter()
        self._model = self._family.load(config, self._placement)
        self._loaded = time.perf_counter()
        self._holder = self._residency_holder()
        self._holder_started = False

    def _residency_holder(self):
        """An on-demand model's holder (deployments.runtime.residency); None for a resident one."""
        memory = getattr(self._config, "memory", None)
        if memory is None or memory.residency != "on_demand":
            return None
        from deployments.runtime.residency import ModelHolder, broker_for
        from deployments.runtime.sim.memory import gpu_key

        room = memory.room
        if room is None:
            raise ValueError(f"{self._config.id}: memory.residency 'on_demand' needs memory.room (the builder fills "
                             "it in from the memory plan of the config's `gpu:`)")
        broker, remote = broker_for(gpu_key(self._placement.simulated or self._placement.device), int(room.budget_gib * 2**30))
        return ModelHolder(self._config.id, int(room.model_gib * 2**30), self._swap(memory), broker, remote,
                           on_move=self._metrics.record_move)

    def _swap(self, memory):
        """What moves the model: the ledger on a simulated card, its modules on a real one, nothing when
        CPU offload keeps its weights in host RAM anyway."""
        from deployments.runtime.residency import LedgerSwap, ModuleSwap

        pipeline = self._model.pipeline
        if self._placement.simulated is not None:
            return LedgerSwap(pipeline.ledger, self._config.id, pipeline.weight_bytes(), pipeline.card.host_to_device_gbs)
        if getattr(memory, "offload", "none") != "none" or getattr(self._model.options, "offload", "none") != "none":
            return None
        modules = [module for module in pipeline.components.values() if hasattr(module, "named_parameters")]
        return ModuleSwap(modules, self._placement.device)

    async def _on_card(self, loading=None):
        """Around a model call: an on-demand model moved onto the GPU first (`loading()` said so)."""
        if self._holder is None:
            return contextlib.nullcontext()
        if not self._holder_started:
            self._holder_started = True
            await self._holder.start()
        return self._holder.use(loading)

    def _ready(self, note: str = "") -> None:
        """Run the warm-up calls, then record and log the cold start. `note`: more for the log line."""
        warming = time.perf_counter()
        # An on-demand model waits in host RAM until its first request: no warm-up moves it in.
        self._warmed_up = [] if self._holder is not None else self._warmup_shapes()
        for shape in self._warmed_up:
            self._warm(shape)
        done = time.perf_counter()
        self._cold_start = {"load_s": round(self._loaded - self._started, 3), "warmup_s": round(done - warming, 3)}
        self._metrics.record_cold_start(done - self._started)
        config, placement = self._config, self._placement
        logger.info("%s (%s) loaded from %s on %s/%s in %.1fs, warmed up (%d shapes) in %.1fs%s", config.id,
                    self._family.name, config.source, placement.device, placement.dtype_name,
                    self._cold_start["load_s"], len(self._warmed_up), self._cold_start["warmup_s"],
                    f"; {note}" if note else "")

    def _warmup_shapes(self) -> list[dict]:
        """The warm-up calls the entry's `warmup:` asks for, each a dict `_warm` runs (and info shows)."""
        raise NotImplementedError

    def _warm(self, shape: dict) -> None:
        """One warm-up call of `shape`, without a progress target."""
        raise NotImplementedError

    def info(self) -> dict:
        """What GET /v1/models shows of this replica (subclasses add theirs, the model its own)."""
        config, placement = self._config, self._placement
        return {
            "id": config.id,
            "family": self._family.name,
            "source": config.source,
            "device": placement.device,
            "dtype": placement.dtype_name,
            "memory_fraction": placement.memory_fraction,
            "warmup_shapes": self._warmed_up,
            "cold_start": self._cold_start,
            # An on-demand model: whether it is on the GPU now, its moves and their seconds.
            "residency": None if self._holder is None else self._holder.describe(),
            **self._model.info(),
            **self._simulation(),
        }

    def _simulation(self) -> dict:
        """On a simulated device: the card, tier, architecture and memory plan it models."""
        describe = getattr(self._model.pipeline, "describe", None)
        return {} if describe is None else {"simulation": describe()}

    async def device_time(self) -> dict:
        """This replica's model-call totals (busy seconds, their CPU, calls): `genserve bench` reads
        them through a handle before and after a level (`deployments.runtime.metrics.DeviceClock`)."""
        return self._metrics.device_time()

    def check_health(self) -> None:
        """Serve's health check: the device answers; the gauges set once are recorded again (Ray
        drops a series not recorded for about half a minute)."""
        check_device_health(self._placement)
        self._metrics.refresh()
