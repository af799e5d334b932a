"""The default job store: SQLite in WAL mode, result files on disk next to it. No server.

    <data_dir>/jobs.sqlite3           the job table
    <data_dir>/files/<job id>/<name>  result files (image-0.png, video.mp4, ...)

Durability: every change that matters (a submit, a state change, a result) is committed with
synchronous=FULL, i.e. the WAL is fsynced before the call returns, so a 202 is only sent for a job
that survives a crash or a power cut. Progress updates commit with synchronous=NORMAL: they are
advisory, and the next full commit makes them durable too. Result files are written and fsynced
inside the transaction that marks the job succeeded; a crash between the two leaves the job
running, so it is re-run and the files, named by job id and file name, are overwritten, never
duplicated.

One process dispatches at a time: the holder of the runner lease (a row with an expiry, the
`runner_lease` table). Ray Serve starts a new JobRunner replica while the old one drains (a
rolling update, an unhealthy replica replaced), so two can open the file at once; the new one
stands by until the old one has put its jobs back and released the lease, or until the lease
expires when the old one died. Every runner write checks the lease inside its own transaction
(`LeaseLost` otherwise), as the Redis store does in its scripts. Expiry is by the wall clock: all
runners of one file are on one node. In a process, a lock serialises threads on one connection.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from serve_app.jobs.fairness import (
    PRIORITIES,
    PRIORITY_RANK,
    FairPolicy,
    GroupUsage,
    Queued,
    group_of,
    pick,
)
from serve_app.jobs.model import (
    CANCELLED,
    PENDING,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    ActiveJobsExceeded,
    Job,
    QueuedJobsExceeded,
    ResultFile,
    dumps,
    history_entry,
    new_deliveries,
    scoped_idempotency_key,
    with_requeue,
)
from serve_app.jobs.store import CANCEL_REASON, CANCELLED_AT_REQUEUE, JobStore, LeaseLost, _now

SCHEMA_VERSION = 5  # 2: the owner column; 3: the runner_lease table; 4: targets and deliveries; 5: fairness (grp, priority, fair_usage)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    version INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    progress TEXT,
    error TEXT,
    result TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    history TEXT NOT NULL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_kind_state ON jobs (kind, state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
-- One row: who holds the runner lease, until when (wall clock), and its epoch: every acquire takes
-- the next, so a runner that lost the lease never matches again, even after re-acquiring.
-- The quality gate's tallies: per model and metric, named counters and score-histogram bins.
CREATE TABLE IF NOT EXISTS quality (
    model TEXT NOT NULL,
    metric TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (model, metric, name)
);
-- Webhook and A2A push deliveries of jobs' ends (serve_app.jobs.webhooks), deleted with their job.
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    owner TEXT,
    target TEXT NOT NULL,
    event TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL,
    created_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id, position);
-- Fair queueing (serve_app/jobs/fairness.py): each group's GPU-seconds and jobs, decayed as of `at`.
CREATE TABLE IF NOT EXISTS fair_usage (
    grp TEXT PRIMARY KEY,
    seconds REAL NOT NULL,
    jobs REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runner_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT,
    epoch INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""
_OWNER_INDEX = "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, state, seq)"
_FAIR_INDEX = "CREATE INDEX IF NOT EXISTS jobs_by_group ON jobs (state, kind, grp, created_at, seq)"
# Every column but the request, which can be large (an uploaded image) and is read only to run it.
_RECORD = ("seq, id, kind, state, idempotency_key, request_hash, version, attempts, cancel_requested, created_at, "
           "started_at, finished_at, expires_at, progress, error, result, files, history, owner, targets, grp, priority")
_DELIVERY = "id, job_id, owner, target, event, state, attempts, next_at, created_at, last_status, last_error, delivered_at"


class SqliteJobStore(JobStore):
    leases = True

    def __init__(self, data_dir: str | os.PathLike, ttl_s: float = 86400.0):
        super().__init__(ttl_s)
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._epoch: int | None = None  # the lease this store's runner writes carry (None: unfenced)
        self._db = sqlite3.connect(self.data_dir / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"{self.data_dir}: SQLite could not switch to WAL mode (got {mode!r})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # a store written before jobs had owners: theirs stay None
                self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            if "targets" not in columns:  # a store written before webhooks: no job has any
                self._db.execute("ALTER TABLE jobs ADD COLUMN targets TEXT")
            self._db.execute(_OWNER_INDEX)
            if "grp" not in columns:  # a store from before fair queueing: each owner its own group
                self._db.execute("ALTER TABLE jobs ADD COLUMN grp TEXT")
                self._db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 1")
                self._db.execute("UPDATE jobs SET grp = COALESCE(owner, ?)", (group_of(None),))
            self._db.execute(_FAIR_INDEX)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _write(self, durable: bool = True):
        """One write transaction, holding the database's write lock from the start."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                # Inside the try: BEGIN fails with "database is locked" when another connection
                # holds the write lock past busy_timeout, and synchronous=FULL must come back even
                # then, or every later submit and result would be acknowledged without an fsync.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                else:
                    self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _runner_write(self, durable: bool = True):
        """A runner's write transaction: refused (LeaseLost, nothing changed) unless this store still
        holds the lease it acquired, checked under the database's write lock."""
        with self._write(durable) as db:
            if self._epoch is not None:
                row = db.execute("SELECT owner, epoch, expires_at FROM runner_lease WHERE id = 1").fetchone()
                if row is None or row["owner"] is None or row["epoch"] != self._epoch or row["expires_at"] <= time.time():
                    raise LeaseLost("this runner no longer holds the job runner lease")
            yield db

    # The runner lease

    def acquire_lease(self, owner, ttl_s):
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT owner, epoch, expires_at FROM runner_lease WHERE id = 1").fetchone()
            if row is not None and row["owner"] not in (None, owner) and row["expires_at"] > now:
                return False
            epoch = (row["epoch"] if row is not None else 0) + 1
            db.execute("INSERT INTO runner_lease (id, owner, epoch, expires_at) VALUES (1, ?, ?, ?) "
                       "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, epoch = excluded.epoch, "
                       "expires_at = excluded.expires_at", (owner, epoch, now + ttl_s))
        self._epoch = epoch
        return True

    def renew_lease(self, ttl_s):
        if self._epoch is None:
            return False
        now = time.time()
        with self._write() as db:
            cursor = db.execute("UPDATE runner_lease SET expires_at = ? WHERE id = 1 AND epoch = ? AND owner IS NOT NULL "
                                "AND expires_at > ?", (now + ttl_s, self._epoch, now))
            return cursor.rowcount == 1

    def release_lease(self):
        if self._epoch is not None:
            with self._write() as db:
                db.execute("UPDATE runner_lease SET owner = NULL, expires_at = 0 WHERE id = 1 AND epoch = ?",
                           (self._epoch,))

    def create(self, kind, request, *, idempotency_key=None, request_hash=None, now=None, owner=None,
               max_active=None, group=None, priority="normal", max_queued=None, targets=None):
        now = _now(now)
        idempotency_key = scoped_idempotency_key(owner, idempotency_key)
        with self._write() as db:
            if idempotency_key is not None:
                row = db.execute(f"SELECT {_RECORD} FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    return _job(row), False
            if max_active is not None and self._active(db, owner) >= max_active:
                raise ActiveJobsExceeded(owner, max_active)
            if max_queued is not None and db.execute("SELECT COUNT(*) FROM jobs WHERE owner IS ? AND state = ?",
                                                     (owner, QUEUED)).fetchone()[0] >= max_queued:
                raise QueuedJobsExceeded(owner, max_queued)
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, kind, state, request, idempotency_key, request_hash, created_at, history, owner, "
                "targets, grp, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, QUEUED, dumps(request), idempotency_key, request_hash, now,
                 dumps([history_entry(QUEUED, now, 0)]), owner, dumps(targets) if targets else None,
                 group_of(owner, group), PRIORITY_RANK[priority]),
            )
            return _job(db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def find_idempotent(self, owner, idempotency_key):
        with self._lock:
            row = self._db.execute(f"SELECT {_RECORD} FROM jobs WHERE idempotency_key = ?",
                                   (scoped_idempotency_key(owner, idempotency_key),)).fetchone()
        return None if row is None else _job(row)

    def get(self, job_id, with_request=False):
        columns = "*" if with_request else _RECORD
        with self._lock:
            row = self._db.execute(f"SELECT {columns} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def counts(self):
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {**dict.fromkeys(STATES, 0), **{state: count for state, count in rows}}

    @staticmethod
    def _active(db, owner) -> int:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE owner IS ? AND state IN (?, ?)",
                          (owner, QUEUED, RUNNING)).fetchone()[0]

    def active_count(self, owner):
        with self._lock:
            return self._active(self._db, owner)

    def delete(self, job_id):
        job = self.get(job_id)
        if job is None:
            return None
        if not job.finished:
            return False
        shutil.rmtree(self._folder(job_id), ignore_errors=True)  # files first, as in expire()
        with self._write() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
        return True

    def list(self, state=None, limit=20, before=None, owner=None):
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        sql = f"SELECT {_RECORD} FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit)).fetchall()
        return [_job(row) for row in rows]

    def queue_position(self, job):
        if job.state != QUEUED:
            return None
        with self._lock:
            ahead = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE kind = ? AND state = ? AND seq < ?", (job.kind, QUEUED, job.seq)
            ).fetchone()[0]
        return ahead + 1

    def claim(self, kinds, now=None, policy=None):
        kinds = list(kinds)
        if not kinds:
            return None
        now, policy = _now(now), policy or FairPolicy()
        with self._runner_write() as db:  # one transaction: the choice and the move
            chosen = pick(self._heads(db, kinds, policy), self._usage(db), policy, now)
            if chosen is None:
                return None
            row = db.execute("SELECT * FROM jobs WHERE seq = ?", (chosen.seq,)).fetchone()
            attempt = row["attempts"] + 1
            history = json.loads(row["history"]) + [history_entry(RUNNING, now, attempt)]
            db.execute(
                "UPDATE jobs SET state = ?, attempts = ?, started_at = ?, progress = NULL, version = version + 1, "
                "history = ? WHERE seq = ?",
                (RUNNING, attempt, now, dumps(history), row["seq"]),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE seq = ?", (row["seq"],)).fetchone())

    @staticmethod
    def _heads(db, kinds: list[str], policy: FairPolicy) -> list[Queued]:
        """Each group's first queued job of `kinds` in its own order (priority-shifted submit time, then seq)."""
        marks = ",".join("?" * len(kinds))
        order = "created_at + (1 - priority) * ?, seq"
        rows = db.execute(
            f"SELECT id, grp, created_at, priority, seq FROM (SELECT id, grp, created_at, priority, seq, "
            f"ROW_NUMBER() OVER (PARTITION BY grp ORDER BY {order}) AS rank FROM jobs "
            f"WHERE state = ? AND kind IN ({marks})) WHERE rank = 1",
            (policy.priority_age_s, QUEUED, *kinds)).fetchall()
        return [Queued(row["id"], row["grp"], row["created_at"], row["priority"], row["seq"]) for row in rows]

    @staticmethod
    def _usage(db) -> dict[str, GroupUsage]:
        usage = {row["grp"]: GroupUsage(row["seconds"], row["jobs"], row["at"])
                 for row in db.execute("SELECT grp, seconds, jobs, at FROM fair_usage")}
        for group, running in db.execute("SELECT grp, COUNT(*) FROM jobs WHERE state = ? GROUP BY grp", (RUNNING,)):
            usage.setdefault(group, GroupUsage()).running = running
        return usage

    def record_usage(self, group, seconds, now=None, half_life_s=None):
        now = _now(now)
        with self._runner_write() as db:
            row = db.execute("SELECT seconds, jobs, at FROM fair_usage WHERE grp = ?", (group,)).fetchone()
            before = GroupUsage(*row) if row is not None else GroupUsage(at=now)
            spent, jobs = before.decayed(now, half_life_s or FairPolicy().half_life_s)
            db.execute("INSERT INTO fair_usage (grp, seconds, jobs, at) VALUES (?, ?, ?, ?) ON CONFLICT (grp) DO "
                       "UPDATE SET seconds = excluded.seconds, jobs = excluded.jobs, at = excluded.at",
                       (group, spent + seconds, jobs + 1, now))

    def usage(self):
        with self._lock:
            return self._usage(self._db)

    def queued(self, kind):
        with self._lock:
            rows = self._db.execute("SELECT id, grp, created_at, priority, seq FROM jobs WHERE state = ? AND kind = ?",
                                    (QUEUED, kind)).fetchall()
        return [Queued(row["id"], row["grp"], row["created_at"], row["priority"], row["seq"]) for row in rows]

    def transition(self, job_id, expect, to, *, attempt=None, reason=None, error=None, cancel_requested=None,
                   refund_attempt=False, now=None, fenced=True):
        now = _now(now)
        with (self._runner_write() if fenced else self._write()) as db:
            row = db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] not in set(expect) or (attempt is not None and row["attempts"] != attempt):
                return None
            if row["state"] == RUNNING and to == QUEUED and cancel_requested is not False and row["cancel_requested"]:
                # A cancel asked for while it ran wins over a requeue: never back in the queue to run again.
                to, reason, refund_attempt = CANCELLED, f"{CANCELLED_AT_REQUEUE}; {reason or 'requeued'}", False
            self._apply(db, row, to, now, reason=reason, error=error, cancel_requested=cancel_requested,
                        requeue=refund_attempt and to == QUEUED)
            if refund_attempt:
                db.execute("UPDATE jobs SET attempts = attempts - 1 WHERE seq = ? AND attempts > 0", (row["seq"],))
            return _job(db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def request_cancel(self, job_id, now=None):
        now = _now(now)
        with self._write() as db:  # one transaction: a claim or requeue cannot slip in between
            row = db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == QUEUED:
                self._apply(db, row, CANCELLED, now, reason=CANCEL_REASON)
            elif row["state"] == RUNNING:
                self._apply(db, row, RUNNING, now, cancel_requested=True)
            else:
                return _job(row), False
            return _job(db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def _apply(self, db, row, to, now, *, reason=None, error=None, cancel_requested=None, result=None,
               files=None, requeue=False) -> None:
        """`requeue`: a requeue that spent no attempt, coalesced in the history (see `with_requeue`)."""
        updates = {"state": to}
        if to != row["state"]:
            entry = history_entry(to, now, row["attempts"], reason)
            history = json.loads(row["history"])
            history = with_requeue(history, entry) if requeue else [*history, entry]
            updates["history"] = dumps(history)
        if to in TERMINAL:
            updates["finished_at"] = now
            updates["expires_at"] = now + self.ttl_s
            if to != row["state"] and row["targets"]:  # told of its end: recorded with the end itself
                self._add_deliveries(db, row, to, now)
        if error is not None:
            updates["error"] = error
        if cancel_requested is not None:
            updates["cancel_requested"] = int(cancel_requested)
        if result is not None:
            updates["result"] = dumps(result)
        if files is not None:
            updates["files"] = dumps([f.to_dict() for f in files])
        assignments = ", ".join(f"{column} = ?" for column in updates)
        db.execute(f"UPDATE jobs SET {assignments}, version = version + 1 WHERE seq = ?",
                   (*updates.values(), row["seq"]))

    def record_progress(self, job_id, attempt, progress):
        with self._runner_write(durable=False) as db:
            cursor = db.execute(
                "UPDATE jobs SET progress = ?, version = version + 1 "
                "WHERE id = ? AND state = ? AND attempts = ? AND cancel_requested = 0",
                (dumps(progress), job_id, RUNNING, attempt),
            )
            return cursor.rowcount == 1

    def save_result(self, job_id, attempt, result, files, now=None):
        now = _now(now)
        with self._runner_write() as db:
            row = db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != RUNNING or row["attempts"] != attempt or row["cancel_requested"]:
                return None
            self._write_files(job_id, files)
            self._apply(db, row, SUCCEEDED, now, result=result, files=[meta for meta, _ in files])
            return _job(db.execute(f"SELECT {_RECORD} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def _write_files(self, job_id: str, files: list[tuple[ResultFile, bytes]]) -> None:
        folder = self._folder(job_id)
        shutil.rmtree(folder, ignore_errors=True)  # whatever an interrupted earlier run left
        folder.mkdir(parents=True)
        for meta, data in files:
            _check_name(meta.name)
            partial = folder / f".{meta.name}.partial"
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, folder / meta.name)
        _fsync_dir(folder)
        _fsync_dir(self.files_dir)

    def _folder(self, job_id: str) -> Path:
        _check_name(job_id)
        return self.files_dir / job_id

    def read_file(self, job_id, name):
        job = self.get(job_id)
        if job is None or job.state != SUCCEEDED or job.file(name) is None:
            return None
        try:
            return (self._folder(job_id) / name).read_bytes()
        except FileNotFoundError:
            return None

    def expire(self, now=None):
        now = _now(now)
        with self._runner_write() as db:  # a runner without the lease deletes no files either
            ids = [row[0] for row in db.execute(
                "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).fetchall()]
        for job_id in ids:
            # Files first: a crash in between leaves a record without files, which the next sweep
            # removes, never files without a record.
            shutil.rmtree(self._folder(job_id), ignore_errors=True)
            with self._runner_write() as db:
                if db.execute("DELETE FROM jobs WHERE id = ? AND expires_at <= ?", (job_id, now)).rowcount:
                    db.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
        return len(ids)

    @staticmethod
    def _add_deliveries(db, row, state: str, now: float) -> None:
        targets = json.loads(row["targets"])
        for delivery in new_deliveries(row["id"], row["owner"], targets, state, now):
            position = int(delivery["id"].rsplit("_", 1)[1])
            db.execute(f"INSERT OR IGNORE INTO deliveries ({_DELIVERY}, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                       "?, ?, ?)", (*_delivery_row(delivery), position))

    # Targets and deliveries

    def put_target(self, job_id, target):
        with self._write() as db:
            row = db.execute("SELECT state, targets FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            targets = [t for t in json.loads(row["targets"] or "[]") if t["id"] != target["id"]] + [target]
            db.execute("UPDATE jobs SET targets = ?, version = version + 1 WHERE id = ?", (dumps(targets), job_id))
            return True

    def delete_target(self, job_id, target_id):
        with self._write() as db:
            row = db.execute("SELECT targets FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            targets = json.loads(row["targets"] or "[]")
            kept = [t for t in targets if t["id"] != target_id]
            if len(kept) != len(targets):
                db.execute("UPDATE jobs SET targets = ?, version = version + 1 WHERE id = ?",
                           (dumps(kept) if kept else None, job_id))
            return len(kept) != len(targets)

    def deliveries(self, job_id):
        with self._lock:
            rows = self._db.execute(f"SELECT {_DELIVERY} FROM deliveries WHERE job_id = ? ORDER BY position",
                                    (job_id,)).fetchall()
        return [_delivery(row) for row in rows]

    def due_deliveries(self, now=None, limit=100):
        with self._lock:
            rows = self._db.execute(f"SELECT {_DELIVERY} FROM deliveries WHERE state = ? AND next_at <= ? "
                                    "ORDER BY next_at LIMIT ?", (PENDING, _now(now), limit)).fetchall()
        return [_delivery(row) for row in rows]

    def record_delivery(self, delivery_id, attempt, outcome):
        with self._runner_write() as db:
            columns = ("state", "next_at", "last_status", "last_error", "delivered_at")
            cursor = db.execute(
                f"UPDATE deliveries SET attempts = ?, {', '.join(f'{c} = ?' for c in columns)} "
                "WHERE id = ? AND state = ? AND attempts = ?",
                (attempt, *(outcome.get(c) for c in columns), delivery_id, PENDING, attempt - 1))
            if cursor.rowcount != 1:
                return None
            return _delivery(db.execute(f"SELECT {_DELIVERY} FROM deliveries WHERE id = ?", (delivery_id,)).fetchone())

    def add_quality(self, model, metric, increments):
        # Not durable: a tally lost in a crash is a few scores; an fsync per request is not worth it.
        with self._write(durable=False) as db:
            db.executemany(
                "INSERT INTO quality (model, metric, name, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (model, metric, name) DO UPDATE SET value = value + excluded.value",
                [(model, metric, name, float(value)) for name, value in increments.items()],
            )

    def quality_tallies(self):
        with self._lock:
            rows = self._db.execute("SELECT model, metric, name, value FROM quality").fetchall()
        tallies: dict[tuple[str, str], dict[str, float]] = {}
        for row in rows:
            tallies.setdefault((row["model"], row["metric"]), {})[row["name"]] = row["value"]
        return tallies

    def ping(self):
        with self._lock:
            self._db.execute("SELECT 1").fetchone()

    def close(self):
        with self._lock:
            self._db.close()


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != os.path.basename(name):
        raise ValueError(f"not a plain file name: {name!r}")


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        state=row["state"],
        request=json.loads(row["request"]) if "request" in row.keys() else None,
        seq=row["seq"],
        version=row["version"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        history=json.loads(row["history"]),
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        cancel_requested=bool(row["cancel_requested"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        progress=None if row["progress"] is None else json.loads(row["progress"]),
        error=row["error"],
        result=None if row["result"] is None else json.loads(row["result"]),
        files=[ResultFile(**item) for item in json.loads(row["files"])],
        owner=row["owner"],
        targets=json.loads(row["targets"]) if row["targets"] else [],
        group=row["grp"],
        priority=PRIORITIES[row["priority"]],
    )


def _delivery_row(delivery: dict) -> tuple:
    return (delivery["id"], delivery["job_id"], delivery["owner"], dumps(delivery["target"]), delivery["event"],
            delivery["state"], delivery["attempts"], delivery["next_at"], delivery["created_at"],
            delivery["last_status"], delivery["last_error"], delivery["delivered_at"])


def _delivery(row: sqlite3.Row) -> dict:
    return {**dict(row), "target": json.loads(row["target"])}
