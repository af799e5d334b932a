"""Residency: on-demand models move to the GPU when a request needs them and back to host RAM when
another one needs the room (`memory.residency: on_demand`; docs/architecture.md, "Residency").

The shape: one `ResidencyBroker` per GPU, a small async Ray actor (named after the node and the GPU
index) that every on-demand generator of that GPU asks before it uses the card. The generator
deployments stay as they are (one per model, the quality graph and jobs unchanged); the broker only
decides who is on the card:

- least recently used out first, and only a model that no request is using;
- one move at a time (a move-in holds the broker's move lock from the decision to the end of the
  copy, evictions included), so two models never fill the card at once;
- the room it hands out is the plan's (`deployments.runtime.memory_plan`): what the card keeps for
  on-demand models once the resident ones and every process's CUDA context are counted.

A `ModelHolder` lives in each generator replica. `use()` wraps a call: it asks the broker, moves the
model in when told to (the request's progress says "loading model" meanwhile), and releases it after.
A background loop waits on the broker for this model's eviction and moves it out. A move swaps every
parameter and buffer of the model's modules between the device and host copies (pinned on CUDA, so
the copies run at the link's speed); out of the card the modules hold meta tensors, so nothing of
the model stays on the GPU. On a CPU the two holders are both host memory: the swap still happens
(meta while out), which is what the tests observe; pinning is skipped.

A model under CPU offload (`memory.offload`) keeps its weights in host RAM between calls anyway
(diffusers moves them per call): its holder moves nothing and the broker only admits its peak.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

logger = logging.getLogger("ray.serve")
_clock = itertools.count()


@dataclass
class _Entry:
    nbytes: int
    resident: bool = False
    in_use: int = 0
    last_used: int = 0
    leave: asyncio.Event = field(default_factory=asyncio.Event)
    left: asyncio.Event = field(default_factory=asyncio.Event)


class ResidencyBroker:
    """Who of one GPU's on-demand models is on the card (see the module's docstring). Plain async
    Python: in process for tests, a Ray actor per GPU when served (`broker_for`)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.models: dict[str, _Entry] = {}
        self.moves = 0
        self.move_s = 0.0
        self.peak = 0
        self._move = asyncio.Lock()
        self._released = asyncio.Condition()

    @property
    def used(self) -> int:
        return sum(entry.nbytes for entry in self.models.values() if entry.resident)

    async def register(self, owner: str, nbytes: int) -> None:
        """A model (its GPU bytes while resident: weights and a call's activations) joins, out of the card."""
        if nbytes > self.budget:
            raise ValueError(f"{owner} needs {nbytes / 2**30:.1f} GiB on the GPU, more than the "
                             f"{self.budget / 2**30:.1f} GiB the card keeps for on-demand models")
        self.models[owner] = _Entry(nbytes)

    async def acquire(self, owner: str) -> bool:
        """A call of `owner` starts. False: it is on the card. True: the caller must move it in now and
        then call `moved_in` (or `move_failed`); the broker made the room and holds its move lock."""
        entry = self.models[owner]
        entry.in_use += 1
        entry.last_used = next(_clock)
        if entry.resident:
            return False
        try:
            await self._move.acquire()
        except BaseException:
            entry.in_use -= 1
            raise
        try:
            if entry.resident:  # moved in while this call waited for the lock
                self._move.release()
                return False
            while self.used + entry.nbytes > self.budget:
                await self._evict(await self._victim(owner))
            return True
        except BaseException:
            entry.in_use -= 1
            self._move.release()
            raise

    async def moved_in(self, owner: str, seconds: float) -> None:
        self.models[owner].resident = True
        self._count(seconds)
        self.peak = max(self.peak, self.used)
        self._move.release()

    async def move_failed(self, owner: str) -> None:
        self.models[owner].in_use -= 1
        self._move.release()

    async def release(self, owner: str) -> None:
        """A call of `owner` ended: it may be moved out from now on."""
        entry = self.models[owner]
        entry.in_use -= 1
        entry.last_used = next(_clock)
        async with self._released:
            self._released.notify_all()

    async def evictions(self, owner: str) -> str:
        """Returns when the broker wants `owner` off the card (a holder's background loop waits here)."""
        entry = self.models[owner]
        await entry.leave.wait()
        entry.leave.clear()
        return owner

    async def evicted(self, owner: str, seconds: float) -> None:
        self._count(seconds)
        self.models[owner].left.set()

    def status(self) -> dict:
        """What GET /v1/models and the metrics report: who is on the card, the moves and their time."""
        return {"budget_gib": round(self.budget / 2**30, 2), "used_gib": round(self.used / 2**30, 2),
                "peak_gib": round(self.peak / 2**30, 2), "moves": self.moves, "move_s": round(self.move_s, 3),
                "resident": sorted(owner for owner, entry in self.models.items() if entry.resident)}

    async def _victim(self, owner: str) -> str:
        """The least recently used resident model no call is using; waits for one to be released."""
        async with self._released:
            while True:
                idle = [(entry.last_used, name) for name, entry in self.models.items()
                        if name != owner and entry.resident and entry.in_use == 0]
                if idle:
                    return min(idle)[1]
                await self._released.wait()

    async def _evict(self, victim: str) -> None:
        entry = self.models[victim]
        entry.resident = False  # a call of the victim arriving now waits for the move lock, then moves back in
        entry.left.clear()
        entry.leave.set()
        await entry.left.wait()

    def _count(self, seconds: float) -> None:
        self.moves += 1
        self.move_s += seconds


class ModuleSwap:
    """Moves a model's modules between the device and host copies: every parameter and buffer. While
    out, each module holds meta placeholders and this swap the originals (in pinned host memory on
    CUDA), so nothing of the model stays on the device; tied tensors come back tied."""

    def __init__(self, modules: list, device: str):
        self.modules = modules
        self.device = device
        self.host: dict[tuple[int, str, str], object] = {}
        self.lock = threading.Lock()

    def _slots(self):
        """(module, '_parameters' or '_buffers', name) of every tensor the modules hold."""
        for root in self.modules:
            for module in root.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in list(getattr(module, kind).items()):
                        if tensor is not None:
                            yield module, kind, name

    def move_out(self) -> None:
        import torch

        with self.lock:
            moved = set()
            for module, kind, name in self._slots():
                original = getattr(module, kind)[name]
                if original.device.type == "meta":
                    continue
                if self.device != "cpu" and id(original) not in moved:  # pinned: the copy back runs at the link's speed
                    original.data = original.data.to("cpu").pin_memory()
                    moved.add(id(original))
                self.host[(id(module), kind, name)] = original
                placeholder = torch.empty_like(original, device="meta")
                getattr(module, kind)[name] = (torch.nn.Parameter(placeholder, requires_grad=original.requires_grad)
                                               if kind == "_parameters" else placeholder)

    def move_in(self) -> None:
        with self.lock:
            moved = set()
            for module, kind, name in self._slots():
                original = self.host.pop((id(module), kind, name), None)
                if original is None:
                    continue
                if self.device != "cpu" and id(original) not in moved:
                    original.data = original.data.to(self.device, non_blocking=True)
                    moved.add(id(original))
                getattr(module, kind)[name] = original
            if self.device == "cuda":
                import torch

                torch.cuda.synchronize()  # the copies are done before a kernel reads them


class LedgerSwap:
    """The move of a model on a simulated card: its weights held in the GPU's ledger while it is in
    (`deployments.runtime.sim.memory.Ledger`), released when it is out; the time of the copy over the
    card's link is slept, so the CPU stays free as on a real copy."""

    def __init__(self, ledger, owner: str, nbytes: int, link_gbs: float):
        self.ledger, self.owner, self.nbytes, self.link_gbs = ledger, owner, nbytes, link_gbs

    def move_in(self) -> None:
        self.ledger.reserve(f"{self.owner}:weights", self.nbytes)
        time.sleep(self.nbytes / (self.link_gbs * 1e9))

    def move_out(self) -> None:
        time.sleep(self.nbytes / (self.link_gbs * 1e9))
        self.ledger.release(f"{self.owner}:weights")


class ModelHolder:
    """One on-demand model in its generator replica: asks the broker before each call (see the module's
    docstring). `broker` is a `ResidencyBroker` or a Ray actor handle to one (`remote=True`)."""

    def __init__(self, owner: str, nbytes: int, swap: ModuleSwap | None, broker, remote: bool = False,
                 on_move=None):
        self.on_move = on_move or (lambda direction, seconds: None)  # (direction 'in' | 'out', seconds)
        self.resident = False
        self.moves = 0
        self.move_s = 0.0
        self.owner = owner
        self.nbytes = nbytes
        self.swap = swap  # None: offloaded weights, nothing to move
        self.broker = broker
        self.remote = remote
        self.last_move_s = 0.0
        self._task: asyncio.Task | None = None

    async def _call(self, method: str, *args):
        function = getattr(self.broker, method)
        return await (function.remote(*args) if self.remote else function(*args))

    async def start(self) -> None:
        """Join the broker, out of the card (the model was loaded to host memory first)."""
        await self._call("register", self.owner, self.nbytes)
        if self.swap is not None:
            await asyncio.to_thread(self.swap.move_out)
        self._task = asyncio.ensure_future(self._serve_evictions())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @asynccontextmanager
    async def use(self, loading=None):
        """Around one call: the model on the card for its duration. `loading()` is called before a
        move in (the request's progress says "loading model")."""
        self.last_move_s = 0.0
        if await self._call("acquire", self.owner):
            try:
                if loading is not None:
                    loading()
                started = time.perf_counter()
                if self.swap is not None:
                    await asyncio.to_thread(self.swap.move_in)
                self.last_move_s = time.perf_counter() - started
            except BaseException:
                await self._call("move_failed", self.owner)
                raise
            await self._call("moved_in", self.owner, self.last_move_s)
            self._moved("in", self.last_move_s)
        try:
            yield self
        finally:
            await self._call("release", self.owner)

    async def _serve_evictions(self) -> None:
        while True:
            await self._call("evictions", self.owner)
            started = time.perf_counter()
            try:
                if self.swap is not None:
                    await asyncio.to_thread(self.swap.move_out)
            except Exception:  # the broker must hear back, or every move waits forever
                logger.exception("moving %s out of the GPU failed", self.owner)
            seconds = time.perf_counter() - started
            await self._call("evicted", self.owner, seconds)
            self._moved("out", seconds)

    def _moved(self, direction: str, seconds: float) -> None:
        self.resident = direction == "in"
        self.moves += 1
        self.move_s += seconds
        self.on_move(direction, seconds)

    def describe(self) -> dict:
        """What GET /v1/models shows of this model's residency."""
        return {"mode": "on_demand", "resident": self.resident, "room_gib": round(self.nbytes / 2**30, 2),
                "moves": self.moves, "move_s": round(self.move_s, 3)}


_local_brokers: dict[str, ResidencyBroker] = {}


def broker_for(gpu_key: str, budget: int):
    """(broker, remote) of one GPU: the Ray actor made by the first replica that asks (detached: it
    outlives any one replica; its state is soft, rebuilt as replicas register), or outside Ray one in
    this process."""
    import ray

    if not ray.is_initialized():  # in process (a script, a test): one broker per GPU of this process
        return _local_brokers.setdefault(gpu_key, ResidencyBroker(budget)), False
    actor = ray.remote(ResidencyBroker).options(
        name=f"genserve-residency-{gpu_key}", namespace="genserve", get_if_exists=True, lifetime="detached",
        num_cpus=0, max_concurrency=1000)
    return actor.remote(budget), True
