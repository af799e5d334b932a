"""Durable jobs keep their promise under faults (tests/chaos.py): a stream of jobs through real
dispatchers on each real store while store calls fail at random, redis-server is paused past its
timeout (Redis), and the runner is killed and redeployed. `make chaos` runs it longer."""

import re

import pytest

from tests.chaos import FAULTS, Chaos, Timing

JOBS = 60
# Faults closer together than `make chaos`'s (0.5-2 s apart, store bursts as long, Redis paused
# 0.8-1.8 s): the run lasts until every fault happened twice, so their spacing is its length. The
# pause stays longer than the socket timeout (0.5 s) and every fault still lands while jobs run.
TIMING = Timing(fault_every_s=(0.2, 0.7), pause_s=(0.7, 1.2))


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_every_job_ends_once_never_twice_at_once_never_stuck_and_spends_attempts_only_on_failures(kind, tmp_path):
    chaos = Chaos(kind, tmp_path, JOBS, seed=25, timing=TIMING, rounds=2)
    report = chaos.run()
    print("\n" + "\n".join(report.lines()))
    expected = [fault for fault in FAULTS if kind == "redis" or fault != "pause"]
    assert [name for name, count in chaos.injected.items() if count >= 2] == expected, "every fault, twice"
    assert report.submitted == JOBS and report.succeeded + report.failed == JOBS, report.problems
    assert report.clean, report.problems
    assert re.fullmatch(r"chaos: submitted \d+ succeeded \d+ failed \d+ lost \d+ run-twice \d+ stuck \d+",
                        report.lines()[-1]), "the last line make chaos prints, for scripts"
    assert (report.lost, report.run_twice, report.stuck, report.ended_twice, report.unearned_attempts) == (0,) * 5
