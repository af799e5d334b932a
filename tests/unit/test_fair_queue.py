"""Weighted fair queueing across key groups, on both stores (SQLite and a real Redis): the claim's
choice is atomic, follows the weights, leaves paused groups alone and ages low-priority jobs in.
Times are passed in (`now=`), so nothing waits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import build_api
from serve_app.config import FairnessConfig
from serve_app.jobs.dispatch import JobDispatcher
from serve_app.jobs.fairness import FairPolicy, fair_order, shares
from serve_app.jobs.http import JobsApi
from serve_app.jobs.model import QUEUED, RUNNING, SUCCEEDED, QueuedJobsExceeded
from serve_app.services.local import LocalHandle
from tests.fakes import fake_services
from tests.helpers import LOOPBACK, wait_until, wait_until_async
from tests.unit.test_job_dispatch import ControlledGenerator

DEFAULT = FairPolicy()


def _submit(store, owner, count, now=0.0, **fields):
    return [store.create("image", {"prompt": f"{owner} {i}"}, owner=owner, now=now + i * 0.001, **fields)[0]
            for i in range(count)]


def _finish(store, job, seconds, now, policy=DEFAULT):
    store.transition(job.id, {RUNNING}, SUCCEEDED, now=now)
    store.record_usage(job.group, seconds, now=now, half_life_s=policy.half_life_s)


def test_a_key_with_one_job_goes_next_behind_many_of_another(store):
    _submit(store, "k_a", 10)
    late = _submit(store, "k_b", 1, now=5.0)[0]
    first = store.claim(["image"], now=10.0)
    assert first.owner == "k_a" and first.group == "k_a"
    assert store.claim(["image"], now=10.0).id == late.id, "k_a's running job counts against its share"


def test_two_runners_take_turns_and_never_pick_the_same_job(backend):
    one, two = backend.open(), backend.open()
    ids = {job.id for owner in ("k_a", "k_b", "k_c") for job in _submit(one, owner, 10)}
    claimed, lock = [], threading.Lock()

    def claim_all(store):
        while (job := store.claim(["image"], now=100.0)) is not None:
            with lock:
                claimed.append(job)

    threads = [threading.Thread(target=claim_all, args=(store,)) for store in (one, two, one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job.id for job in claimed) == sorted(ids), "every job once, none twice"
    turns = Counter(job.owner for job in claimed[:9])
    assert max(turns.values()) - min(turns.values()) <= 2, f"the groups take turns from the start: {turns}"


def test_a_paused_group_gets_nothing(store):
    policy = FairPolicy(weights={"k_b": 0.0})
    _submit(store, "k_b", 3)
    a = _submit(store, "k_a", 2, now=1.0)
    assert [store.claim(["image"], now=5.0, policy=policy).id for _ in a] == [job.id for job in a]
    assert store.claim(["image"], now=5.0, policy=policy) is None, "weight 0: k_b's jobs stay queued"
    assert store.counts()[QUEUED] == 3
    assert store.claim(["image"], now=5.0).owner == "k_b", "unpaused, they run"


def test_ageing_lets_a_low_priority_job_through_within_its_bound(store):
    policy = FairPolicy(priority_age_s=30.0)
    low = store.create("image", {"prompt": "low"}, owner="k_a", priority="low", now=0.0)[0]
    before_bound = _submit(store, "k_a", 3, now=10.0)  # submitted less than 30 s after it: go first
    after_bound = _submit(store, "k_a", 3, now=31.0)  # more than 30 s after: it goes ahead of them
    high = store.create("image", {"prompt": "high"}, owner="k_a", priority="high", now=35.0)[0]
    order = []
    while (job := store.claim(["image"], now=40.0, policy=policy)) is not None:
        order.append(job.id)
        store.transition(job.id, {RUNNING}, SUCCEEDED, now=40.0)
    assert order == [high.id, *[job.id for job in before_bound], low.id, *[job.id for job in after_bound]]
    assert store.get(low.id).priority == "low" and store.get(high.id).priority == "high"


def test_gpu_time_shares_follow_the_weights(store):
    policy = FairPolicy(weights={"k_a": 3.0, "k_b": 1.0})
    _submit(store, "k_a", 30)
    _submit(store, "k_b", 30)
    ran = Counter()
    for turn in range(20):
        job = store.claim(["image"], now=100.0 + turn, policy=policy)
        ran[job.owner] += 1
        _finish(store, job, 2.0, now=100.5 + turn, policy=policy)
    assert ran == {"k_a": 15, "k_b": 5}
    usage = store.usage()
    share = shares(usage, now=120.0, half_life_s=policy.half_life_s)  # what GET /v1/admin/usage reports
    assert share == {"k_a": pytest.approx(0.75, abs=0.02), "k_b": pytest.approx(0.25, abs=0.02)}
    assert usage["k_a"].jobs > usage["k_b"].jobs and usage["k_a"].running == 0


def test_gpu_seconds_not_jobs_set_the_share(store):
    """A group whose jobs each cost 4x as much gets a quarter as many of them at equal weights."""
    _submit(store, "video", 20)
    _submit(store, "image", 20)
    ran = Counter()
    for turn in range(10):
        job = store.claim(["image"], now=100.0 + turn)
        ran[job.owner] += 1
        _finish(store, job, 4.0 if job.owner == "video" else 1.0, now=100.5 + turn)
    assert ran["image"] == 8 and ran["video"] == 2


def test_the_fair_order_predicts_the_claims(store):
    policy = FairPolicy(weights={"k_a": 2.0})
    _submit(store, "k_a", 6)
    _submit(store, "k_b", 4, now=1.0)
    predicted = [job.id for job in fair_order(store.queued("image"), store.usage(), policy, now=10.0)]
    claimed = [store.claim(["image"], now=10.0, policy=policy).id for _ in range(10)]
    assert claimed == predicted


def test_a_key_past_its_queued_jobs_cap_is_refused(store):
    _submit(store, "k_a", 2, max_queued=2)
    with pytest.raises(QueuedJobsExceeded) as refused:
        store.create("image", {"prompt": "3"}, owner="k_a", max_queued=2)
    assert refused.value.limit == 2
    store.claim(["image"])
    assert store.create("image", {"prompt": "3"}, owner="k_a", max_queued=2)[1], "a running job is not queued"
    assert store.create("image", {"prompt": "b"}, owner="k_b", max_queued=2)[1], "per key"


# The dispatcher: sync turns and queue positions over the same order (fake generators, no Ray)


def _dispatcher(store, generator, policy=FairPolicy):
    return JobDispatcher(store, fake_services(generator=generator).images, None, {"image": 1}, 2,
                         sweep_interval_s=3600, poll_interval_s=0.05, policy=policy)


def test_a_sync_turn_waits_behind_the_running_job_only_and_positions_follow_the_fair_order(store):
    async def scenario():
        generator = ControlledGenerator(gated=True)
        dispatcher = _dispatcher(store, generator)
        dispatcher.start()
        heavy = [(await dispatcher.submit("image", {"prompt": f"a {i}", "seed": i}, owner="k_a"))[0] for i in range(4)]
        await wait_until_async(lambda: generator.started == 1, 5)
        light = (await dispatcher.submit("image", {"prompt": "b", "seed": 9}, owner="k_b"))[0]
        _, position, estimate = await dispatcher.status_with_estimate(light.id)
        assert position == 1 and estimate == 0.0, "k_b is behind its share: next, ahead of k_a's three"
        assert (await dispatcher.status_with_estimate(heavy[3].id))[1] == 4
        assert await dispatcher.sync_turn("image", "k_c", None, wait_s=0.3) is None, "no slot within the wait"
        dispatcher.policy = lambda: FairPolicy(weights={"k_c": 0.0})
        assert await dispatcher.sync_turn("image", "k_c", None, wait_s=10) is None, "paused: at once"
        dispatcher.policy = FairPolicy
        turn = asyncio.ensure_future(dispatcher.sync_turn("image", "k_c", None, wait_s=10))
        await asyncio.sleep(0.2)
        assert not turn.done()
        generator.gate.set()  # k_a's first job ends; then k_b's job and k_c's turn come before k_a's others
        token = await turn
        started = [job.id for job in heavy + [light] if store.get(job.id).state != "queued"]
        await dispatcher.end_turn(token, "k_c", 2.5)
        await wait_until_async(lambda: all(store.get(job.id).state == "succeeded" for job in heavy + [light]), 10)
        await dispatcher.stop()
        return heavy, light, started

    heavy, light, started_before_turn = asyncio.run(scenario())
    assert set(started_before_turn) <= {heavy[0].id, light.id}, "the turn came before k_a's second job"
    assert store.usage()["k_c"].seconds == 2.5, "the sync request's GPU time counts for its group"
    assert store.list(state="succeeded", limit=100, owner="k_c") == [], "its ticket is deleted"


def test_the_fairness_benchmark_counts_shares_only_while_both_keys_wait_and_ends_with_its_line():
    from serve_app.bench.fairness import Done, backlogged_shares, summary_line

    jobs = [Done("a_heavy", 0, start, start + 1, start, 1.0) for start in range(9)]
    jobs += [Done("b_light", 0, start, start + 1, start, 1.0) for start in (0.5, 3.5, 6.5, 20, 21)]
    assert backlogged_shares(jobs) == {"a_heavy": 9.0, "b_light": 3.0}, "b_light's last jobs ran alone: not counted"
    assert summary_line(0.5, 0.98, 9.0, 3.0) == \
        "fairness: B p95 wait 0.50x bound; A+B throughput 0.98x A alone; weights 3:1 -> shares 3.00:1"


def test_the_docs_keys_file_example_gives_the_weights_it_says():
    import re
    from pathlib import Path

    import yaml

    from serve_app.security.keys import KeysFileModel

    doc = (Path(__file__).parents[2] / "docs" / "jobs.md").read_text()
    block = re.search(r"```yaml\n# keys file[^\n]*\n(.*?)```", doc, re.S).group(1)
    model = KeysFileModel.model_validate(yaml.safe_load(block.replace("sha256: ...", "sha256: " + "a" * 64)))
    assert model.weights() == {"research": 3.0, "k_ci": 1.0, "k_batch": 0.0}
    assert [key.fair_group for key in model.keys] == ["research", "research", "k_ci", "k_batch"]
    with pytest.raises(ValueError, match="not under groups"):
        KeysFileModel.model_validate({"keys": [{"id": "k", "sha256": "0" * 64, "group": "nope"}]})


# Over HTTP (the FastAPI app in process, a stand-in runner): the cap's 429 and the sync turn


class _TurnRunner:
    """What the ingress asks the JobRunner for, answered as a busy fair queue would."""

    def __init__(self, token=None):
        self.token, self.turns, self.ended = token, [], []

    async def submit(self, kind, request, idempotency_key, digest, owner, max_active, group, priority, max_queued,
                     targets=None):
        self.submitted = (owner, group, priority)
        return None, "queued_jobs", 2

    async def sync_turn(self, kind, owner, group, wait_s):
        self.turns.append((kind, owner, wait_s))
        return self.token

    async def end_turn(self, token, group, device_s):
        self.ended.append((token, group, device_s))


def _app(runner):
    services = fake_services()
    services.jobs = JobsApi(LocalHandle(runner), services.images, None, 2,
                            fairness=FairnessConfig(sync_max_wait_s=7))
    app = build_api()
    app.state.services = services
    return TestClient(app, client=LOOPBACK)


def test_a_submit_past_the_queued_jobs_cap_is_a_429_naming_it_and_priority_reaches_the_runner():
    runner = _TurnRunner()
    response = _app(runner).post("/v1/jobs", json={"kind": "image", "request": {"prompt": "a fox"}, "priority": "low"})
    assert response.status_code == 429 and response.json()["limit"] == "queued_jobs", response.text
    assert runner.submitted == ("local", None, "low")
    bad = _app(runner).post("/v1/jobs", json={"kind": "image", "request": {"prompt": "a fox"}, "priority": "urgent"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "priority"]


def test_a_sync_request_runs_in_its_turn_and_charges_its_gpu_time_or_gets_a_503():
    runner = _TurnRunner(token="t1")
    response = _app(runner).post("/v1/images", json={"prompt": "a fox", "seed": 1})
    assert response.status_code == 200 and runner.turns == [("image", "local", 7)]
    # The turn's end is sent as the response goes out, not awaited before it.
    wait_until(lambda: runner.ended, 5, interval_s=0.01, what="the turn ended")
    assert runner.ended == [("t1", "local", response.json()["timings"]["device"])]
    busy = _app(_TurnRunner(token=None)).post("/v1/images", json={"prompt": "a fox"})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "7"
    assert "jobs.fairness.sync_max_wait_s" in busy.json()["detail"]


def test_a_turn_whose_end_cannot_be_sent_is_logged_and_the_response_still_goes_out(caplog):
    class Unreachable(_TurnRunner):
        async def end_turn(self, token, group, device_s):
            self.ended.append(token)
            raise ConnectionError("JobRunner gone")

    runner = Unreachable(token="t2")
    with caplog.at_level("WARNING", logger="serve_app.jobs.http"):
        response = _app(runner).post("/v1/images", json={"prompt": "a fox", "seed": 1})
        wait_until(lambda: "could not end sync turn t2" in caplog.text, 5, interval_s=0.01, what="the warning")
    assert response.status_code == 200 and runner.ended == ["t2"]


class _HeldTurnRunner(_TurnRunner):
    """Gives its turn only once the prompt is being enhanced (bounded), and records what had run by then."""

    def __init__(self, token, enhancer, generator):
        super().__init__(token)
        self.enhancer, self.generator, self.seen = enhancer, generator, None

    async def sync_turn(self, kind, owner, group, wait_s):
        self.turns.append((kind, owner, wait_s))
        with contextlib.suppress(TimeoutError):  # without the overlap the enhancer waits for this turn
            await wait_until_async(lambda: self.enhancer.calls, 2, interval_s=0.01, what="the enhancer called")
        self.seen = (len(self.enhancer.calls), len(self.generator.calls))
        return self.token


def _held_app(token):
    from tests.fakes import FakeEnhancer, FakeGenerator

    enhancer, generator = FakeEnhancer(), FakeGenerator()
    runner = _HeldTurnRunner(token, enhancer, generator)
    services = fake_services(enhancer=enhancer, generator=generator)
    services.jobs = JobsApi(LocalHandle(runner), services.images, None, 2, fairness=FairnessConfig(sync_max_wait_s=7))
    app = build_api()
    app.state.services = services
    return TestClient(app, client=LOOPBACK), runner


def test_the_prompt_is_enhanced_while_the_turn_comes_and_nothing_is_generated_before_it():
    client, runner = _held_app("t3")
    response = client.post("/v1/images", json={"prompt": "a fox", "seed": 1})
    assert response.status_code == 200, response.text
    assert runner.seen == (1, 0), "enhanced before the turn came, generated only after"
    assert len(runner.generator.calls) == 1 and response.json()["timings"]["turn"] >= 0
    wait_until(lambda: runner.ended, 5, interval_s=0.01, what="the turn ended")
    assert runner.ended == [("t3", "local", response.json()["timings"]["device"])]


def test_no_turn_is_asked_for_a_request_its_plan_refuses_and_a_refused_turn_generates_nothing():
    client, runner = _held_app(None)
    bad = client.post("/v1/images", json={"prompt": "a fox", "num_inference_steps": 30})
    assert bad.status_code == 422 and "1-4 steps" in bad.text and runner.turns == [], "refused before any turn"
    busy = client.post("/v1/images", json={"prompt": "a fox"})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "7" and len(runner.turns) == 1
    assert runner.generator.calls == [] and runner.ended == [], "no turn: nothing generated, nothing to end"


def test_with_another_request_in_flight_the_prompt_waits_for_its_turn_before_the_enhancer_sees_it():
    """Under load a turn can wait long: the enhancer then runs only for requests let in, and a
    request waiting its turn holds no place at its model (two places here, three requests: one
    running at a time, as one slot gives them, they all get through)."""
    from types import SimpleNamespace

    from tests.fakes import FakeEnhancer
    from tests.helpers import app_settings, model_entry

    class OneSlotRunner(_TurnRunner):
        """Turns one at a time, the first once released: each waits for the one before it to end."""

        def __init__(self):
            super().__init__("t")
            self.release, self.enhanced_at_ask = asyncio.Event(), []

        async def sync_turn(self, kind, owner, group, wait_s):
            index = len(self.turns)
            self.turns.append(kind)
            self.enhanced_at_ask.append(len(enhancer.calls))
            await self.release.wait()
            await wait_until_async(lambda: len(self.ended) >= index, 5, interval_s=0.01, what="the turn before")
            return f"t{index}"

    enhancer = FakeEnhancer()
    two_places = model_entry(deployment={"max_ongoing_requests": 2, "max_queued_requests": 0})
    services = fake_services(app_settings(two_places), enhancer=enhancer)
    runner = OneSlotRunner()
    api = JobsApi(LocalHandle(runner), services.images, None, 2, fairness=FairnessConfig(sync_max_wait_s=7))
    request = SimpleNamespace(state=SimpleNamespace())  # no gate in front: the local caller

    def sync_request(seed):
        return asyncio.ensure_future(api.in_turn(request, lambda: services.generate_images({"prompt": "a", "seed": seed})))

    async def scenario():
        first = sync_request(1)
        await wait_until_async(lambda: enhancer.calls, 5, interval_s=0.01, what="the lone request enhanced")
        others = [sync_request(2), sync_request(3)]
        await wait_until_async(lambda: len(runner.turns) == 3, 5, interval_s=0.01, what="every turn asked")
        # Their turns asked for (the runner's tasks run after the requests await them), their prompts are not:
        assert len(enhancer.calls) == 1, "the later requests wait for their turns first"
        runner.release.set()
        return await asyncio.gather(first, *others)

    responses = asyncio.run(scenario())
    assert len(enhancer.calls) == 3 and [response.images[0].seed for response in responses] == [1, 2, 3]
    assert all(response.timings["turn"] >= 0 for response in responses)
