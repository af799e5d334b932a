"""One suite for every JobStore: SQLite (a temp data dir) and Redis (a real redis-server on loopback).

The `backend` and `store` fixtures (tests/unit/conftest.py) run each test against both. Times are
passed in explicitly (`now=`), so expiry and timings are checked without waiting.
"""

from __future__ import annotations

import threading

import pytest

from serve_app.jobs.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, ResultFile
from tests.job_stores import TTL

PNG = ResultFile("image-0.png", "image/png", 4)


def _image(prompt="a fox", **fields):
    return {"prompt": prompt, **fields}


def test_create_records_a_queued_job(store):
    job, created = store.create("image", _image(seed=1), now=100.0)
    assert created and job.state == QUEUED and job.kind == "image" and job.attempts == 0
    assert job.created_at == 100.0 and job.history == [{"state": QUEUED, "at": 100.0, "attempt": 0}]
    assert job.request is None, "records are read without their (possibly large) request"
    assert store.get(job.id, with_request=True).request == {"prompt": "a fox", "seed": 1}
    assert store.get("no-such-job") is None


def test_idempotency_key_returns_the_same_job(store):
    first, created = store.create("image", _image(), idempotency_key="k1", request_hash="h1")
    again, created_again = store.create("image", _image(), idempotency_key="k1", request_hash="h1")
    other, _ = store.create("image", _image(), idempotency_key="k2")
    assert created and not created_again
    assert again.id == first.id and again.request_hash == "h1" and other.id != first.id
    assert len(store.list()) == 2


def test_counts_name_every_state(store):
    assert store.counts() == {QUEUED: 0, RUNNING: 0, SUCCEEDED: 0, FAILED: 0, CANCELLED: 0}
    store.create("image", _image("one"))
    store.create("video", _image("two"))
    store.claim(["image"])
    assert store.counts() == {QUEUED: 1, RUNNING: 1, SUCCEEDED: 0, FAILED: 0, CANCELLED: 0}


def test_claim_is_first_in_first_out_per_kind(store):
    image1 = store.create("image", _image("one"))[0]
    video = store.create("video", {"prompt": "v"})[0]
    image2 = store.create("image", _image("two"))[0]
    assert [store.queue_position(j) for j in (image1, video, image2)] == [1, 1, 2]
    claimed = store.claim(["image"], now=200.0)
    assert claimed.id == image1.id and claimed.state == RUNNING and claimed.attempts == 1
    assert claimed.started_at == 200.0 and claimed.request == {"prompt": "one"}
    assert claimed.history[-1] == {"state": RUNNING, "at": 200.0, "attempt": 1}
    assert store.queue_position(store.get(image2.id)) == 1 and store.queue_position(claimed) is None
    assert store.claim(["video", "image"]).id == video.id, "the oldest job of the kinds asked for"
    assert store.claim(["image"]).id == image2.id
    assert store.claim(["image", "video"]) is None and store.claim([]) is None


def test_each_job_is_claimed_once_under_concurrent_claims(store):
    ids = {store.create("image", _image(str(i)))[0].id for i in range(20)}
    claimed, lock = [], threading.Lock()

    def claim_all():
        while (job := store.claim(["image"])) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)


def test_transition_is_compare_and_set_on_state_and_attempt(store):
    job = store.create("image", _image())[0]
    assert store.transition(job.id, {RUNNING}, FAILED) is None, "not running yet"
    running = store.claim(["image"])
    assert store.transition(job.id, {RUNNING}, FAILED, attempt=2) is None, "a different attempt"
    failed = store.transition(job.id, {RUNNING}, FAILED, attempt=1, reason="boom", error="it broke", now=300.0)
    assert failed.state == FAILED and failed.error == "it broke" and failed.version > running.version
    assert failed.finished_at == 300.0 and failed.expires_at == 300.0 + TTL
    assert failed.history[-1] == {"state": FAILED, "at": 300.0, "attempt": 1, "reason": "boom"}
    assert store.transition(job.id, {RUNNING}, SUCCEEDED) is None
    assert store.transition("no-such-job", {QUEUED}, RUNNING) is None


def test_progress_only_for_the_running_attempt(store):
    job = store.create("image", _image())[0]
    assert not store.record_progress(job.id, 1, {"step": 1}), "queued jobs have no progress"
    store.claim(["image"])
    assert store.record_progress(job.id, 1, {"stage": "generate", "step": 2, "steps": 4})
    assert store.get(job.id).progress == {"stage": "generate", "step": 2, "steps": 4}
    assert not store.record_progress(job.id, 2, {"step": 3}), "a stale report of another attempt"
    store.request_cancel(job.id)
    assert not store.record_progress(job.id, 1, {"step": 3}), "a cancel was asked for: the run should stop"


def test_result_is_saved_once_keyed_by_job_id(store):
    job = store.create("image", _image())[0]
    store.claim(["image"])
    saved = store.save_result(job.id, 1, {"images": [{"file": PNG.name}]}, [(PNG, b"\x89PNG")], now=400.0)
    assert saved.state == SUCCEEDED and saved.result == {"images": [{"file": PNG.name}]}
    assert saved.files == [PNG] and saved.expires_at == 400.0 + TTL
    assert store.read_file(job.id, PNG.name) == b"\x89PNG"
    assert store.read_file(job.id, "other.png") is None and store.read_file(job.id, "../jobs.sqlite3") is None
    assert store.save_result(job.id, 1, {"again": True}, [(PNG, b"late")]) is None, "a second result is refused"
    assert store.read_file(job.id, PNG.name) == b"\x89PNG"


def test_a_late_result_from_an_interrupted_attempt_is_refused(store):
    job = store.create("image", _image())[0]
    first = store.claim(["image"])
    store.retry_or_fail(first, "the replica died", retry_limit=2)
    second = store.claim(["image"])
    assert second.attempts == 2
    assert store.save_result(job.id, 1, {"from": 1}, [(PNG, b"one")]) is None
    assert store.save_result(job.id, 2, {"from": 2}, [(PNG, b"two")]).result == {"from": 2}
    assert store.read_file(job.id, PNG.name) == b"two"


def test_cancel_queued_running_and_finished(store):
    queued = store.create("image", _image("q"))[0]
    cancelled, changed = store.request_cancel(queued.id, now=500.0)
    assert changed and cancelled.state == CANCELLED and cancelled.history[-1]["reason"] == "cancelled before it started"
    assert store.claim(["image"]) is None, "a cancelled job never starts"

    running = store.create("image", _image("r"))[0]
    store.claim(["image"])
    flagged, changed = store.request_cancel(running.id)
    assert changed and flagged.state == RUNNING and flagged.cancel_requested
    assert store.save_result(running.id, 1, {}, [(PNG, b"x")]) is None, "no result once a cancel is asked for"
    stopped = store.transition(running.id, {RUNNING}, CANCELLED, attempt=1, reason="stopped at step 2")
    assert stopped.state == CANCELLED
    assert store.request_cancel(running.id) == (store.get(running.id), False), "finished jobs are left as they are"
    assert store.request_cancel("no-such-job") is None


def test_retry_then_fail_past_the_retry_limit(store):
    job = store.create("video", {"prompt": "v"})[0]
    for attempt in (1, 2):
        claimed = store.claim(["video"])
        assert claimed.attempts == attempt
        requeued = store.retry_or_fail(claimed, f"crash {attempt}", retry_limit=1 if attempt == 1 else 0)
        if attempt == 1:
            assert requeued.state == QUEUED and "crash 1; retrying (attempt 2 of 2)" in requeued.history[-1]["reason"]
        else:
            assert requeued.state == FAILED and requeued.error == "crash 2; gave up after 2 attempts"
    reasons = [entry.get("reason") for entry in store.get(job.id).history]
    assert reasons[0] is None and reasons[2].startswith("crash 1") and reasons[4] == "crash 2"


def test_jobs_left_running_are_requeued_after_a_crash(backend, store):
    running = store.create("image", _image("running"))[0]
    last_try = store.create("image", _image("last try"))[0]
    cancelling = store.create("image", _image("cancelling"))[0]
    queued = store.create("image", _image("queued"), idempotency_key="q")[0]
    store.claim(["image"])
    for _ in range(3):  # last_try: attempt 3 is running, and retry_limit 2 allows no more
        job = store.claim(["image"])
        if job.attempts < 3:
            store.retry_or_fail(job, "crash", retry_limit=2)
    store.claim(["image"])
    store.request_cancel(cancelling.id)

    reopened = backend.crash_and_reopen()
    changed = {job.id: job for job in reopened.requeue_running(retry_limit=2, reason="the runner stopped")}
    assert changed[running.id].state == QUEUED and changed[running.id].attempts == 1
    assert changed[last_try.id].state == FAILED and "gave up after 3 attempts" in changed[last_try.id].error
    assert changed[cancelling.id].state == CANCELLED
    assert queued.id not in changed and reopened.get(queued.id).state == QUEUED
    assert reopened.create("image", _image(), idempotency_key="q")[0].id == queued.id
    assert reopened.claim(["image"]).id == running.id, "a requeued job keeps its place in the queue"


def test_results_survive_a_crash(backend, store):
    job = store.create("image", _image())[0]
    store.claim(["image"])
    store.save_result(job.id, 1, {"ok": True}, [(PNG, b"bytes")])
    reopened = backend.crash_and_reopen()
    assert reopened.get(job.id).state == SUCCEEDED
    assert reopened.read_file(job.id, PNG.name) == b"bytes"


def test_finished_jobs_expire_after_the_ttl_with_their_files(store):
    done = store.create("image", _image("done"), idempotency_key="done")[0]
    store.claim(["image"], now=1000.0)
    store.save_result(done.id, 1, {}, [(PNG, b"png")], now=1000.0)
    failed = store.create("image", _image("failed"))[0]
    store.claim(["image"], now=1010.0)
    store.transition(failed.id, {RUNNING}, FAILED, attempt=1, now=1010.0)
    waiting = store.create("image", _image("waiting"), now=0.0)[0]

    assert store.expire(now=1000.0 + TTL - 1) == 0 and store.get(done.id) is not None
    assert store.expire(now=1000.0 + TTL) == 1
    assert store.get(done.id) is None and store.read_file(done.id, PNG.name) is None
    assert store.create("image", _image(), idempotency_key="done")[1], "the key is free again"
    assert store.expire(now=1e12) == 1, "the failed job; unfinished jobs never expire"
    assert store.get(failed.id) is None and store.get(waiting.id).state == QUEUED


def test_list_filters_by_state_and_pages_newest_first(store):
    ids = [store.create("image", _image(str(i)))[0].id for i in range(5)]
    store.claim(["image"])  # ids[0] runs
    assert [job.id for job in store.list(state=QUEUED)] == ids[:0:-1]
    assert [job.id for job in store.list(state=RUNNING)] == [ids[0]]
    first_page = store.list(limit=2)
    assert [job.id for job in first_page] == [ids[4], ids[3]]
    second_page = store.list(limit=2, before=first_page[-1].seq)
    assert [job.id for job in second_page] == [ids[2], ids[1]]
    assert [job.id for job in store.list(limit=2, before=second_page[-1].seq)] == [ids[0]]
    assert store.list(state=SUCCEEDED) == []


# Owners (API key ids): ownership, per-owner idempotency, the active-jobs quota, deletion


def test_jobs_record_their_owner_and_list_by_owner(store):
    a1 = store.create("image", _image("a1"), owner="k_a")[0]
    b1 = store.create("image", _image("b1"), owner="k_b")[0]
    a2 = store.create("video", _image("a2"), owner="k_a")[0]
    internal = store.create("image", _image("internal"))[0]
    assert store.get(a1.id).owner == "k_a" and b1.owner == "k_b" and internal.owner is None
    assert [job.id for job in store.list(owner="k_a")] == [a2.id, a1.id]
    assert [job.id for job in store.list(owner="k_b")] == [b1.id]
    assert len(store.list()) == 4, "no owner: every job (admin)"
    store.claim(["image"])  # a1 starts
    assert [job.id for job in store.list(state=QUEUED, owner="k_a")] == [a2.id]
    assert [job.id for job in store.list(owner="k_a", limit=1)] == [a2.id]
    assert [job.id for job in store.list(owner="k_a", before=a2.seq)] == [a1.id]


def test_idempotency_keys_are_scoped_per_owner(store):
    a, created_a = store.create("image", _image(), idempotency_key="same", request_hash="h", owner="k_a")
    b, created_b = store.create("image", _image(), idempotency_key="same", request_hash="h", owner="k_b")
    again, created_again = store.create("image", _image(), idempotency_key="same", request_hash="h", owner="k_a")
    assert created_a and created_b and not created_again
    assert a.id != b.id and again.id == a.id


def test_active_jobs_quota_counts_queued_and_running(store):
    from serve_app.jobs.model import ActiveJobsExceeded

    first = store.create("image", _image("1"), owner="k_a", max_active=2)[0]
    store.create("image", _image("2"), owner="k_a", max_active=2)
    store.claim(["image"])  # one running, one queued: still two active
    with pytest.raises(ActiveJobsExceeded):
        store.create("image", _image("3"), owner="k_a", max_active=2)
    assert store.active_count("k_a") == 2 and len(store.list(owner="k_a")) == 2
    assert store.create("image", _image("b"), owner="k_b", max_active=2)[1], "quotas are per owner"
    store.request_cancel(first.id)  # cancelling a running job ends it only when its runner stops
    store.transition(first.id, {RUNNING}, CANCELLED)
    assert store.active_count("k_a") == 1
    assert store.create("image", _image("3"), owner="k_a", max_active=2)[1], "room again once one ended"


def test_delete_removes_a_finished_job_and_its_files(store):
    job = store.create("image", _image(), owner="k_a", idempotency_key="d")[0]
    assert store.delete(job.id) is False, "queued: not deleted"
    claimed = store.claim(["image"])
    store.save_result(claimed.id, 1, {"images": []}, [(PNG, b"\x89PNG")])
    assert store.read_file(job.id, PNG.name) == b"\x89PNG"
    assert store.delete(job.id) is True
    assert store.get(job.id) is None and store.read_file(job.id, PNG.name) is None
    assert store.list(owner="k_a") == [] and store.delete(job.id) is None
    assert store.create("image", _image(), owner="k_a", idempotency_key="d")[1], "its idempotency key is free again"


def test_a_sqlite_store_from_before_owners_gains_the_column(tmp_path):
    import sqlite3

    from serve_app.jobs.sqlite_store import SqliteJobStore

    old = SqliteJobStore(tmp_path, ttl_s=TTL)
    job = old.create("image", _image())[0]
    old.close()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("DROP INDEX jobs_by_owner")
    db.execute("ALTER TABLE jobs DROP COLUMN owner")  # the table as schema version 1 wrote it
    db.commit()
    db.close()
    store = SqliteJobStore(tmp_path, ttl_s=TTL)
    assert store.get(job.id).owner is None, "old jobs have no owner: admin keys see them"
    assert store.create("image", _image(), owner="k_a")[0].owner == "k_a"
    store.close()


def test_a_locked_progress_write_leaves_commits_fsynced(tmp_path):
    """A progress write runs with synchronous=NORMAL; when another connection holds the write lock
    past busy_timeout its BEGIN fails, and synchronous=FULL must still come back for later commits."""
    import sqlite3

    from serve_app.jobs.sqlite_store import SqliteJobStore

    store = SqliteJobStore(tmp_path, ttl_s=TTL)
    store.create("image", _image())
    job = store.claim(["image"])
    store._db.execute("PRAGMA busy_timeout=50")  # fail fast instead of after 10 s
    other = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.record_progress(job.id, 1, {"step": 1})
    other.execute("ROLLBACK")
    other.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2, "FULL: acknowledged commits are fsynced"
    assert store.record_progress(job.id, 1, {"step": 2})
    store.close()


def test_a_cancel_racing_a_claim_and_requeue_loop_always_lands(store):
    """A runner claims a job and puts it back (no capacity) over and over while its user cancels
    it: the cancel is never answered "already finished" for a job that was not, and once it is
    answered the job never runs again: it is cancelled, or flagged and cancelled at the requeue."""
    import time

    stop = threading.Event()

    def claim_and_requeue():
        while not stop.is_set():
            job = store.claim(["image"])
            if job is not None:  # its snapshot says no cancel, as a runner's would
                store.requeue_unspent(job, "not run: no capacity")

    loop = threading.Thread(target=claim_and_requeue)
    loop.start()
    try:
        for round_ in range(150):
            job = store.create("image", _image(f"race {round_}"))[0]
            time.sleep(0.0005 * (round_ % 5))
            found = store.request_cancel(job.id)
            answered = time.time()
            assert found is not None and found[1], f"round {round_}: the cancel was lost ({found[0].state})"
            for _ in range(500):
                current = store.get(job.id)
                if current.state == CANCELLED:
                    break
                time.sleep(0.002)
            assert current.state == CANCELLED, f"round {round_}: {current.state}, cancel_requested " \
                                               f"{current.cancel_requested}"
            assert not [entry for entry in current.history if entry["state"] == RUNNING and entry["at"] > answered]
    finally:
        stop.set()
        loop.join()


def test_requeues_that_spend_no_attempt_coalesce_into_one_history_entry(store):
    """A job waiting at capacity is claimed and put back again and again: its history keeps one
    entry for all of it, with the count and the last reason, instead of two entries a time."""
    job = store.create("image", _image(), now=1.0)[0]
    for turn in range(50):
        claimed = store.claim(["image"], now=10.0 + turn)
        store.requeue_unspent(claimed, f"not run: busy ({turn})", now=10.5 + turn)
    job = store.get(job.id)
    assert job.state == QUEUED and job.attempts == 0
    assert [entry["state"] for entry in job.history] == [QUEUED, RUNNING, QUEUED]
    last = job.history[-1]
    assert last["requeues"] == 50 and last["at"] == 59.5
    assert last["reason"] == "not run: busy (49); back in the queue (the attempt is not counted)"
    # A real failure is its own entry; requeues after it start a count of their own.
    claimed = store.claim(["image"], now=100.0)
    store.retry_or_fail(claimed, "RuntimeError: boom", retry_limit=2, now=101.0)
    for turn in range(3):
        store.requeue_unspent(store.claim(["image"], now=110.0 + turn), "not run: busy", now=110.5 + turn)
    job = store.get(job.id)
    assert [(entry["state"], entry.get("requeues")) for entry in job.history] == [
        (QUEUED, None), (RUNNING, None), (QUEUED, 50), (RUNNING, None), (QUEUED, None), (RUNNING, None), (QUEUED, 3)]
    assert store.claim(["image"]).attempts == 2, "only the real failure counted"


def test_quality_tallies_add_up_per_model_and_metric(store):
    store.add_quality("flux", "aesthetic", {"b5000": 2, "generated": 3, "device_seconds": 0.25})
    store.add_quality("flux", "aesthetic", {"b5000": 1, "b7000": 1, "device_seconds": 0.5})
    store.add_quality("sdxl", "alignment", {"accepted": 1})
    assert store.quality_tallies() == {
        ("flux", "aesthetic"): {"b5000": 3.0, "b7000": 1.0, "generated": 3.0, "device_seconds": 0.75},
        ("sdxl", "alignment"): {"accepted": 1.0},
    }


def test_quality_tallies_survive_reopening(backend):
    backend.open().add_quality("flux", "aesthetic", {"accepted": 2})
    assert backend.open().quality_tallies() == {("flux", "aesthetic"): {"accepted": 2.0}}
