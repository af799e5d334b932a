"""The quality gate's tallies in the job store (`serve_app.services.quality.QualityBook`): the
JobRunner, which owns the store, reads and adds to it directly; every Ingress replica through the
runner's handle, so all of them share one calibration and one set of pass rates."""

from __future__ import annotations

import asyncio

from serve_app.jobs.store import JobStore
from serve_app.services.quality import Calibration, QualityBook, Tally


class StoreQualityBook(QualityBook):
    def __init__(self, store: JobStore, starting: Calibration | None = None):
        super().__init__(starting)
        self.store = store

    async def _add(self, model: str, metric: str, increments: Tally) -> None:
        await asyncio.to_thread(self.store.add_quality, model, metric, increments)

    async def _read(self) -> dict[tuple[str, str], Tally]:
        return await asyncio.to_thread(self.store.quality_tallies)


class RunnerQualityBook(QualityBook):
    """Over the JobRunner's handle (`JobRunner.add_quality`, `JobRunner.quality_tallies`)."""

    def __init__(self, runner, starting: Calibration | None = None):
        super().__init__(starting)
        self.runner = runner

    async def _add(self, model: str, metric: str, increments: Tally) -> None:
        await self.runner.add_quality.remote(model, metric, increments)

    async def _read(self) -> dict[tuple[str, str], Tally]:
        return await self.runner.quality_tallies.remote()
