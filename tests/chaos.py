"""Fault injection for durable jobs: a stream of jobs through real job runners on a real store
while faults happen, then the invariant checked over every job's history.

Shared by the suite (tests/unit/test_job_chaos.py: short runs on both stores) and `make chaos`
(`python -m tests.chaos --jobs N --store sqlite|redis`: a longer run that prints the figures).

What runs is the real dispatcher (`JobDispatcher`, what the JobRunner replica runs) on the real
store (SQLite in a temporary folder, or a throwaway redis-server), over the real image service
with a fake model (tests.fakes) that takes a few milliseconds per run and fails some runs: a
"real failure" of the job's own, which may spend an attempt. Each runner replica is a thread with
its own event loop and its own store connection, as each replica is a process with its own.

The faults:
- `store`: any store call raises ConnectionError at random, before it reaches the store (nothing
  done) or after it did its work (the change committed, its answer lost), as a Redis timeout or
  failover, or SQLite's "database is locked", does;
- `pause` (Redis only): redis-server stopped with SIGSTOP for longer than the store's socket
  timeout, then resumed with SIGCONT;
- `kill`: the runner holding the lease dies: its event loop stops and no line of it runs again
  (no stop(), no release; a store call already in flight lands, as a request already sent does),
  and a new runner starts, as Serve replaces a dead replica;
- `redeploy`: a rolling update: a new runner starts (standing by for the lease) while the old one
  goes on, then the old one stops as Serve stops a draining replica (`JobDispatcher.stop`).
The real Ray versions of the last two (ray.kill of the JobRunner actor, serve.run of a changed
app) are integration tests: tests/integration/test_jobs_chaos.py and test_jobs_restart.py.

The invariant, per accepted job: it ends exactly once in a terminal state (`lost`: unknown to the
store; `stuck`: not finished once the faults stop and the runners had time to settle); it never
runs twice at once (two runs of the model for it overlapping in time); an attempt is spent only by
a real failure of its own: the model failed that run, or the runner running it was killed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from serve_app.jobs.dispatch import RESTART_REASON, JobDispatcher
from serve_app.jobs.model import FAILED, RUNNING, SUCCEEDED, TERMINAL
from tests.fakes import FakeGenerator, fake_services

FAULTS = ("store", "pause", "kill", "redeploy")
FAILURE = "chaos: the model failed"
POISON = "poison"  # in a prompt: every run of that job fails
TAG = re.compile(r"chaos-(\d+)")


@dataclass(frozen=True)
class Timing:
    """Short enough that faults come and go many times in a run."""

    lease_ttl_s: float = 3.0
    redis_timeout_s: float = 0.5
    pause_s: tuple[float, float] = (0.8, 1.8)  # longer than the socket timeout, shorter than the lease
    store_error_rate: float = 0.03
    model_failure_rate: float = 0.05
    poison_rate: float = 0.02
    run_s: tuple[float, float] = (0.01, 0.12)
    fault_every_s: tuple[float, float] = (0.5, 2.0)
    replace_after_s: tuple[float, float] = (0.1, 0.6)  # Serve starting a replica for a dead one
    settle_s: float = 60.0


class ChaosStore:
    """A store whose calls fail at random while `enabled` is set: `rate` of them raise
    ConnectionError, half before the call (nothing done), half after it (done, answer lost)."""

    def __init__(self, store, rate: float, enabled: threading.Event, seed: int, runner: str = "",
                 claims: dict | None = None):
        self._store, self._rate, self._enabled = store, rate, enabled
        self._random = random.Random(seed)
        self._guard = threading.Lock()
        self.injected = 0
        # Which runner claimed each (job id, attempt), its answer lost or not: a crash interrupts only its own runs.
        self.runner, self.claims = runner, {} if claims is None else claims

    def _roll(self) -> str | None:
        if not self._enabled.is_set():
            return None
        with self._guard:
            if self._random.random() >= self._rate:
                return None
            self.injected += 1
            return self._random.choice(("before", "after"))

    def __getattr__(self, name):
        attribute = getattr(self._store, name)
        if not callable(attribute) or name == "close":
            return attribute

        def call(*args, **kwargs):
            fault = self._roll()
            if fault == "before":
                raise ConnectionError(f"chaos: the store's {name} failed")
            result = attribute(*args, **kwargs)
            if name == "claim" and result is not None:
                self.claims[(result.id, result.attempts)] = self.runner
            if fault == "after":
                raise ConnectionError(f"chaos: the store's {name} answer was lost")
            return result

        return call


@dataclass
class Run:
    runner: str
    started: float
    ended: float | None = None
    outcome: str = "running"


class ChaosModel(FakeGenerator):
    """The model deployment every runner calls: records each run of each job (by the chaos tag in
    its prompt) and fails some, as a real model failure."""

    def __init__(self, timing: Timing, seed: int):
        super().__init__()
        self.timing = timing
        self._random = random.Random(seed)
        self._guard = threading.Lock()
        self.runs: dict[int, list[Run]] = {}
        self.runner_of_loop: dict[asyncio.AbstractEventLoop, str] = {}

    async def generate(self, params, prompt):
        tag = int(TAG.search(prompt.prompt).group(1))
        with self._guard:
            duration = self._random.uniform(*self.timing.run_s)
            fails = POISON in prompt.prompt or self._random.random() < self.timing.model_failure_rate
            run = Run(self.runner_of_loop.get(asyncio.get_running_loop(), "?"), time.monotonic())
            self.runs.setdefault(tag, []).append(run)
        try:
            await asyncio.sleep(duration)
            if fails:
                run.outcome = "failed"
                raise RuntimeError(FAILURE)
            output = await super().generate(params, prompt)
            run.outcome = "done"
            return output
        except asyncio.CancelledError:
            run.outcome = "cancelled"
            raise
        finally:
            run.ended = time.monotonic()

    def end_runs_of(self, runner: str, at: float) -> None:
        """A killed runner's runs end at its death (its event loop never resumes them)."""
        with self._guard:
            for runs in self.runs.values():
                for run in runs:
                    if run.runner == runner and run.ended is None:
                        run.ended, run.outcome = at, "killed"


class Runner:
    """One JobRunner replica: a dispatcher on its own event loop (a thread) and its own store."""

    def __init__(self, name: str, store, model: ChaosModel, timing: Timing, deliverer=None):
        """`deliverer(store)`: the webhook deliverer this runner's dispatcher runs (none by default)."""
        self.name, self.store = name, store
        self.loop = asyncio.new_event_loop()
        model.runner_of_loop[self.loop] = name
        images = fake_services(generator=model).images
        self.dispatcher = JobDispatcher(store, images, None, {"image": 2}, retry_limit=2, sweep_interval_s=3600,
                                        poll_interval_s=0.05, lease_ttl_s=timing.lease_ttl_s,
                                        deliverer=None if deliverer is None else deliverer(store))
        self.alive = True
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"chaos-{name}", daemon=True)
        self.thread.start()
        self.call(self._start(), timeout_s=5)

    async def _start(self) -> None:
        self.dispatcher.start()

    def call(self, coroutine, timeout_s: float):
        """Run `coroutine` on this runner's loop (as a request to the replica); TimeoutError if it is dead."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def holds_lease(self) -> bool:
        return self.alive and self.dispatcher.info()["lease"] == "held"

    def kill(self) -> float:
        """The replica dies: its loop stops after the callbacks already due, and never runs again."""
        self.alive = False
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        return time.monotonic()

    def stop(self, timeout_s: float = 60) -> None:
        """Serve stops the replica (a redeploy, a scale-down): the JobRunner's __del__."""
        self.alive = False
        try:
            self.call(self.dispatcher.stop(), timeout_s)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class Backend:
    """The store each runner opens (its own connection), and for Redis the server to pause."""

    def __init__(self, kind: str, folder: Path, timing: Timing):
        self.kind, self.folder, self.timing = kind, folder, timing
        self.server = None
        self.paused = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "redis":
            from tests.redis_server import RedisServer

            self.server = RedisServer(folder).start()
        self.stores = []

    def open(self):
        if self.kind == "redis":
            from serve_app.jobs.redis_store import RedisJobStore

            store = RedisJobStore(self.server.url, prefix="chaos:jobs", connect_timeout_s=self.timing.redis_timeout_s,
                                  socket_timeout_s=self.timing.redis_timeout_s)
        else:
            from serve_app.jobs.sqlite_store import SqliteJobStore

            store = SqliteJobStore(self.folder / "jobs")
        self.stores.append(store)
        return store

    def pause(self, seconds: float) -> None:
        """SIGSTOP redis-server for `seconds`, then SIGCONT."""
        with self.paused:
            os.kill(self.server.process.pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)
            finally:
                os.kill(self.server.process.pid, signal.SIGCONT)

    def close(self) -> None:
        for store in self.stores:
            try:
                store.close()
            except Exception:  # a killed runner's connection may be mid-call
                pass
        if self.server is not None:
            self.server.stop()


@dataclass
class Report:
    store: str
    faults: tuple[str, ...]
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    run_twice: int = 0
    stuck: int = 0
    ended_twice: int = 0  # more than one terminal entry, or a terminal one not last
    unearned_attempts: int = 0  # attempts spent by no real failure of the job's own
    injected: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.harness_errors or self.lost or self.run_twice or self.stuck or self.ended_twice or self.unearned_attempts)

    def lines(self) -> list[str]:
        injected = ", ".join(f"{name} {count}" for name, count in self.injected.items())
        return [
            f"chaos: store {self.store}, faults {'+'.join(self.faults)} ({injected}); {self.seconds:.0f}s",
            f"chaos: ended twice {self.ended_twice}, attempts spent without a failure of their own "
            f"{self.unearned_attempts}",
            f"chaos: submitted {self.submitted} succeeded {self.succeeded} failed {self.failed} lost {self.lost} "
            f"run-twice {self.run_twice} stuck {self.stuck}",
        ]


class Chaos:
    """One chaos run: submit `jobs` jobs through the live runners while faults happen, then settle
    and check (see the module docstring)."""

    def __init__(self, kind: str, folder: Path, jobs: int, faults=FAULTS, seed: int = 0,
                 timing: Timing | None = None, rounds: int = 1, keep_logs: bool = True):
        timing = timing or Timing()
        faults = tuple(f for f in faults if kind == "redis" or f != "pause")
        self.kind, self.jobs, self.faults, self.timing = kind, jobs, faults, timing
        self.rounds = rounds  # the stream goes on until every fault happened this many times
        self.keep_logs = keep_logs  # the runners' log (a warning for each fault they meet)
        self.random = random.Random(seed)
        self.backend = Backend(kind, folder, timing)
        self.model = ChaosModel(timing, seed)
        self.store_errors = threading.Event()
        self.runners: list[Runner] = []
        self.killed: set[str] = set()  # the runners killed
        self.claims: dict[tuple[str, int], str] = {}  # (job id, attempt) -> the runner that claimed it
        self.injected = {name: 0 for name in faults}
        self.ids: dict[int, str] = {}  # chaos tag -> job id, once its submit was acknowledged
        self._chaos_stores: list[ChaosStore] = []
        self._count = 0
        self.events: list[tuple[float, str]] = []  # (wall time, what): for the report of a problem
        self.harness_errors: list[str] = []
        self.reader = self.backend.open()  # the checker's own connection, never faulted

    # Runners

    def _new_runner(self) -> Runner:
        self._count += 1
        while True:  # a replica whose start fails (the store did not answer in time) is started again
            try:
                opened = self.backend.open()
                break
            except Exception:
                time.sleep(0.1)
        name = f"runner-{self._count}"
        store = ChaosStore(opened, self.timing.store_error_rate, self.store_errors, self.random.randrange(1 << 30),
                           name, self.claims)
        self._chaos_stores.append(store)
        runner = Runner(name, store, self.model, self.timing)
        self.runners.append(runner)
        return runner

    def _live(self) -> list[Runner]:
        return [runner for runner in self.runners if runner.alive]

    # The client

    def _submit(self, tag: int) -> None:
        """Submit job `tag`, retrying (the same idempotency key) until a runner acknowledges it."""
        poison = self.random.random() < self.timing.poison_rate
        request = {"prompt": f"chaos-{tag}{' ' + POISON if poison else ''}", "seed": tag, "width": 256,
                   "height": 256, "num_inference_steps": 1}
        while True:
            live = self._live()
            if live:
                runner = self.random.choice(live)
                try:
                    job, _, _ = runner.call(runner.dispatcher.submit("image", request, f"chaos-{tag}"), timeout_s=3)
                    self.ids[tag] = job.id
                    return
                except Exception:  # the store failed, or the runner died under the call: retry
                    pass
            time.sleep(0.05)

    # Faults

    def _fault(self, name: str) -> None:
        timing, began = self.timing, time.time()
        self.events.append((began, f"{name} begins"))
        if name == "store":  # a burst of store errors on top of the background rate
            self.store_errors.set()
            time.sleep(self.random.uniform(*timing.fault_every_s))
        elif name == "pause":
            self.backend.pause(self.random.uniform(*timing.pause_s))
        elif name == "kill":
            holders = [runner for runner in self._live() if runner.holds_lease()] or self._live()
            victim = self.random.choice(holders)
            self.killed.add(victim.name)
            self.model.end_runs_of(victim.name, victim.kill())
            self.events.append((time.time(), f"killed {victim.name}"))
            time.sleep(self.random.uniform(*timing.replace_after_s))
            self._new_runner()
        elif name == "redeploy":
            old = self._live()
            self._new_runner()
            time.sleep(self.random.uniform(0.05, 0.5))  # both up for a while, the old one still dispatching
            for runner in old:
                runner.stop()
        self.injected[name] += 1
        self.events.append((time.time(), f"{name} ends ({time.time() - began:.2f}s)"))

    def _inject_until(self, done: threading.Event) -> None:
        """Every fault in turn, in a shuffled order each round, so that a short run sees them all."""
        try:
            while not done.is_set():
                for name in self.random.sample(self.faults, len(self.faults)):
                    time.sleep(self.random.uniform(*self.timing.fault_every_s))
                    if done.is_set():
                        return
                    self._fault(name)
        except Exception as error:  # the harness's own failure: reported, never a silently quiet run
            self.harness_errors.append(f"fault injection stopped: {type(error).__name__}: {error}")

    # The run

    def run(self) -> Report:
        started = time.monotonic()
        watcher = _LeaseEvents(self.events, self.keep_logs)
        logging.getLogger("ray.serve").addFilter(watcher)
        try:
            return self._run(started)
        finally:
            logging.getLogger("ray.serve").removeFilter(watcher)

    def _run(self, started: float) -> Report:
        self._new_runner()
        if "store" in self.faults:
            self.store_errors.set()
        done = threading.Event()
        injector = threading.Thread(target=self._inject_until, args=(done,), name="chaos-faults", daemon=True)
        injector.start()
        try:
            for tag in range(self.jobs):
                self._submit(tag)
                time.sleep(self.random.uniform(0, 0.04))
            # Until every job finished and every fault happened `rounds` times.
            self._wait_finished(lambda: self._finished() >= self.jobs and min(self.injected.values()) >= self.rounds,
                                self.timing.settle_s / 2)
        finally:
            done.set()
            injector.join(30)
            self.store_errors.clear()
        self._wait_finished(lambda: self._finished() >= self.jobs, self.timing.settle_s)
        report = self._check()
        report.harness_errors = self.harness_errors
        report.problems += self.harness_errors
        for runner in self._live():
            runner.stop()
        self.backend.close()
        report.injected = {**self.injected, **({"store errors": sum(s.injected for s in self._chaos_stores)}
                                               if "store" in self.faults else {})}
        report.seconds = time.monotonic() - started
        return report

    def _finished(self) -> int:
        store = self.reader
        try:
            return sum(1 for job_id in self.ids.values() if (job := store.get(job_id)) and job.state in TERMINAL)
        except Exception:
            return 0

    @staticmethod
    def _wait_finished(condition, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not condition():
            time.sleep(0.2)

    # The invariant

    def _crashed(self, job_id: str, run: dict) -> bool:
        """Whether the runner that claimed this run (its `running` entry) was killed."""
        return self.claims.get((job_id, run["attempt"])) in self.killed

    def _claimers(self, job) -> list[str | None]:
        return [self.claims.get((job.id, attempt)) for attempt in range(1, job.attempts + 1)]

    def _check(self) -> Report:
        report = Report(self.kind, self.faults, submitted=len(self.ids))
        store = self.reader
        for tag, job_id in sorted(self.ids.items()):
            job = store.get(job_id)
            if job is None:
                report.lost += 1
                report.problems.append(f"chaos-{tag} ({job_id}): lost")
                continue
            if job.state not in TERMINAL:
                report.stuck += 1
                report.problems.append(f"chaos-{tag} ({job_id}): still {job.state} ({job.history[-1]})")
                continue
            report.succeeded += job.state == SUCCEEDED
            report.failed += job.state == FAILED
            terminal = [i for i, entry in enumerate(job.history) if entry["state"] in TERMINAL]
            if terminal != [len(job.history) - 1]:
                report.ended_twice += 1
                report.problems.append(f"chaos-{tag}: terminal entries at {terminal} of {len(job.history)}")
            if _overlapping(self.model.runs.get(tag, [])):
                report.run_twice += 1
                report.problems.append(f"chaos-{tag}: two runs at once: {self.model.runs[tag]}; history "
                                       f"{_brief(job.history)}; claimed by {self._claimers(job)}")
            unearned = unearned_attempts(job.history, lambda run, job_id=job.id: self._crashed(job_id, run))
            if unearned:
                report.unearned_attempts += len(unearned)
                report.problems.append(f"chaos-{tag}: attempts spent by {unearned}; history {_brief(job.history)}; "
                                       f"claimed by {self._claimers(job)}")
        return report


class _LeaseEvents(logging.Filter):
    """On the runners' logger: notes their lease changes (taken, lost) as events for the report of
    a problem; `keep`: whether their records go on to the log (False: `make chaos` stays quiet)."""

    def __init__(self, events: list, keep: bool):
        super().__init__()
        self.events, self.keep = events, keep

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "the lease" in message and record.threadName.startswith("chaos-runner"):
            self.events.append((record.created, f"{record.threadName.removeprefix('chaos-')}: {message[:120]}"))
        return self.keep


def _brief(history: list[dict]) -> str:
    return " > ".join(f"{entry['state']}({entry['attempt']}{', ' + entry['reason'][:40] if entry.get('reason') else ''})@{time.strftime('%H:%M:%S', time.localtime(entry['at']))}"
                      f".{int(entry['at'] % 1 * 1000):03d}" for entry in history)


def _overlapping(runs: list[Run]) -> bool:
    spans = sorted((run.started, run.ended if run.ended is not None else float("inf")) for run in runs)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def unearned_attempts(history: list[dict], crashed: Callable[[dict], bool]) -> list[str]:
    """The reasons of the attempts `history` spent that no real failure explains: a run ended
    queued or failed, counting its attempt, but the model did not fail it, and `crashed` (given
    the run's `running` entry) says its runner was not killed while it ran."""
    unearned = []
    for before, entry in zip(history, history[1:]):
        if before["state"] != RUNNING or entry["state"] not in ("queued", FAILED):
            continue
        reason = entry.get("reason") or ""
        if entry.get("requeues") or "the attempt is not counted" in reason:
            continue  # refunded
        if reason.startswith(f"RuntimeError: {FAILURE}"):
            continue
        if reason.startswith(RESTART_REASON) and crashed(before):
            continue  # a crash of its runner counts, by design (a job that kills its runner must not loop)
        unearned.append(reason)
    return unearned


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--store", choices=("sqlite", "redis"), default="redis")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, of " + ", ".join(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="the runners' log (warnings about each fault)")
    args = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.INFO)  # the lease changes, for the report
    if not args.verbose:  # in-process handles' tasks and killed runners' tasks, never resumed: not news
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s.%(msecs)03d %(threadName)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", level=logging.INFO)
    with tempfile.TemporaryDirectory(prefix="genserve-chaos-") as folder:
        chaos = Chaos(args.store, Path(folder), args.jobs, tuple(args.faults.split(",")), args.seed,
                      keep_logs=args.verbose)
        report = chaos.run()
    if not args.verbose:  # killed runners' runs, never resumed, end with the process: not news
        logging.getLogger("ray.serve").addFilter(lambda record: False)
    if args.verbose or not report.clean:
        for at, what in chaos.events:
            print(f"  {time.strftime('%H:%M:%S', time.localtime(at))}.{int(at % 1 * 1000):03d} {what}")
    for problem in report.problems[:50]:
        print(f"  {problem}")
    print("\n".join(report.lines()))
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
