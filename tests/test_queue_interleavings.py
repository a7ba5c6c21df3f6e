"""The job queue cannot livelock, on PostgreSQL: the transitions of core.db.jobs driven in random
interleavings by the API (submit, cancel), two workers (claim, heartbeat, progress, stage, succeed,
finish, pause, die) and a reconciler whose read and write are separate steps (so that anything can land
between them, as it can on a real database), with messages delivered in any order and duplicated, and
the clock moving. After every step:

- a job is claimable or terminal: a queued job has no owner, no heartbeat and no cancel pending;
- a message delivered for a queued job changes its state (it is claimed, or ends): no copy is dropped
  while the job waits;
- a job is never resent more than a bounded number of times without a state change (the interval
  doubles: at most 1 + log2(1 + waited / requeue_after) copies);
- a worker that lost its job writes nothing: every write it attempts returns False and leaves the row
  as it was.

Then the specific failures that made the livelock, each a test of its own, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random
from collections import Counter, defaultdict
from contextlib import ExitStack, suppress

import pytest
from sqlalchemy import select

from core.db import jobs, tenants
from core.db.models import ACTIVE_STATUSES, LEASED_STATUSES, TERMINAL_STATUSES, Base, Job, JobStatus, Tenant
from core.db.session import Database
from core.settings import Settings
from tests.stack import POSTGRES_GROUP, _postgres_available, require_services, throwaway_database
from worker.lease import is_stale

HEARTBEAT_TIMEOUT, REQUEUE_AFTER = 30.0, 60.0
WORKERS = ("host-a:1", "host-b:2")


@pytest.fixture(params=["sqlite", POSTGRES_GROUP])
def db(request, tmp_path):
    with ExitStack() as cleanup:
        if request.param == POSTGRES_GROUP:
            request.node.add_marker(pytest.mark.xdist_group(POSTGRES_GROUP))
            require_services(_postgres_available())
            _, url = cleanup.enter_context(throwaway_database())
        else:
            url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        database = Database(url)
        cleanup.callback(database.engine.dispose)
        Base.metadata.create_all(database.engine)
        with database.transaction() as session:
            session.add(Tenant(id="tn_test", name="test"))
        yield database


SETTINGS = Settings(heartbeat_timeout=HEARTBEAT_TIMEOUT, requeue_after=REQUEUE_AFTER)


def row(session, job_id) -> dict:
    job = session.get(Job, job_id)
    return {c.key: getattr(job, c.key) for c in Job.__table__.columns if c.key != "updated_at"}


def advance_clock(session, seconds: float) -> None:
    """Time passes: every stored time moves back, as if the database's clock moved on."""
    delta = dt.timedelta(seconds=seconds)
    for job in session.scalars(select(Job)):
        for column in ("heartbeat_at", "enqueued_at", "started_at"):
            if getattr(job, column) is not None:
                setattr(job, column, getattr(job, column) - delta)


class World:
    """The actors, the messages in flight and what the invariants need to remember."""

    def __init__(self, db: Database, rng: random.Random, busy: bool = False):
        self.db, self.rng = db, rng
        self.busy = busy  # the workers keep their jobs (and nobody cancels): queued jobs wait, and are resent
        self.messages: list[str] = []
        self.delivered: list[str] = []
        self.leases: dict[str, jobs.Lease | None] = dict.fromkeys(WORKERS)
        self.zombies: list[jobs.Lease] = []  # leases of stalled processes, which may still write
        self.snapshot: tuple[list[Job], list[str]] | None = None  # the reconciler's read, acted on later
        self.state: dict[str, tuple] = {}  # job id -> (status, attempts) when last seen
        self.resends: Counter[str] = Counter()  # since the job last changed state
        self.waited: defaultdict[str, float] = defaultdict(float)  # seconds since the job last changed state
        self.log: list[str] = []

    def run(self, work):
        return self.db.run(work)

    # --- the API ---

    def submit(self) -> None:
        def create(session):
            tenants.lock_tenant(session, "tn_test")
            return jobs.create(session, tenant_id="tn_test", max_active=4, dataset_name="digits", spec={}, max_attempts=3).id

        try:
            job_id = self.run(create)
        except jobs.ActiveJobLimit:
            return
        self.send(job_id)

    def send(self, job_id: str) -> None:
        self.run(lambda session: jobs.mark_enqueued(session, job_id))
        self.messages.append(job_id)

    def cancel(self) -> None:
        job_id = self.any_job(active=True)
        if job_id is None or self.busy:
            return
        with suppress(jobs.JobFinished):
            self.run(lambda session: jobs.request_cancel(session, session.get_one(Job, job_id)))

    # --- the broker ---

    def deliver(self) -> None:
        idle = [w for w, lease in self.leases.items() if lease is None]
        if not self.messages or not idle:
            return
        job_id = self.messages.pop(self.rng.randrange(len(self.messages)))
        self.delivered.append(job_id)
        worker = self.rng.choice(idle)
        before = self.run(lambda session: row(session, job_id))
        job = self.run(lambda session: jobs.claim(session, job_id, worker, is_stale=lambda j, now: is_stale(j, SETTINGS, now)))
        after = self.run(lambda session: row(session, job_id))
        if before["status"] == JobStatus.QUEUED:
            assert job is not None or after["status"] in TERMINAL_STATUSES, (
                f"a message for queued job {job_id} was dropped and the job left as it was: {after}"
            )
        if job is not None:
            self.leases[worker] = jobs.Lease(job_id, worker, job.attempts)

    def redeliver(self) -> None:
        if self.delivered:
            self.messages.append(self.rng.choice(self.delivered))

    def lose(self) -> None:
        """The broker loses a message (a restart without persistence): only the reconciler can replace it."""
        if self.messages:
            self.messages.pop(self.rng.randrange(len(self.messages)))

    # --- the workers ---

    def pause(self) -> None:
        """A worker process stalls holding its lease (a long pause, a partition), and a new process of the same
        name (a reused pid) starts idle beside it; the stalled one may wake and write at any time."""
        worker = self.rng.choice(WORKERS)
        if self.leases[worker] is not None and not self.busy:
            self.zombies.append(self.leases[worker])
            self.leases[worker] = None

    def wake(self) -> None:
        if self.zombies:
            lease = self.zombies.pop(self.rng.randrange(len(self.zombies)))
            self.write(lease.worker, lease)

    def work(self) -> None:
        worker = self.rng.choice(WORKERS)
        lease = self.leases[worker]
        if lease is not None:
            self.write(worker, lease)

    def write(self, worker: str, lease: jobs.Lease) -> None:
        current = self.leases.get(worker) == lease  # else a stalled process's
        actions = {"heartbeat": 8, "progress": 2, "stage": 1, "succeed": 1, "fail": 1, "cancelled": 1, "die": 1}
        if self.busy:
            actions = {"heartbeat": 1, "progress": 1}
        action = self.rng.choices(list(actions), list(actions.values()))[0]
        if action == "die":
            if current:
                self.leases[worker] = None
            return
        before = self.run(lambda session: row(session, lease.job_id))
        owns = before["worker"] == worker and before["attempts"] == lease.attempt and before["status"] in LEASED_STATUSES
        transitions = {
            "heartbeat": lambda s: jobs.heartbeat(s, lease).owned,
            "progress": lambda s: jobs.report_progress(s, lease, {"fraction": 0.5}, "training"),
            "stage": lambda s: jobs.report_stage(s, lease, JobStatus.EVALUATING, "evaluating"),
            "succeed": lambda s: jobs.succeed(
                s, lease, result={}, best={}, evaluation={"status": "complete"}, warnings=[], execution={}, artifacts=[]
            ),
            "fail": lambda s: jobs.finish(s, lease, JobStatus.FAILED, error="boom"),
            "cancelled": lambda s: jobs.finish(s, lease, JobStatus.CANCELLED),
        }
        if action == "cancelled" and not before["cancel_requested"]:
            action = "heartbeat"
        done = self.run(transitions[action])
        after = self.run(lambda session: row(session, lease.job_id))
        if not owns:
            assert not done and after == before, f"{worker}, which lost job {lease.job_id}, wrote it ({action}): {before} -> {after}"
            if current:
                self.leases[worker] = None  # it learns it lost the job
        elif not done:
            raise AssertionError(f"{worker} owns job {lease.job_id} but its {action} was refused: {before}")
        if done and action in ("succeed", "fail", "cancelled") and current:
            self.leases[worker] = None

    # --- the reconciler, its read and its write apart ---

    def reconcile_read(self) -> None:
        def read(session):
            now = jobs.clock(session)
            stale = [job for job in jobs.leased(session) if is_stale(job, SETTINGS, now)]
            return stale, jobs.due_for_delivery(session, now, dt.timedelta(seconds=REQUEUE_AFTER))

        self.snapshot = self.run(read)

    def reconcile_write(self) -> None:
        if self.snapshot is None:
            return
        stale, due = self.snapshot
        self.snapshot = None
        for job in stale:
            self.run(lambda session, job=job: jobs.release(session, job, "stopped responding"))
        for job_id in due:
            self.resends[job_id] += 1 if self.state.get(job_id, (None,))[0] == JobStatus.QUEUED else 0
            self.send(job_id)

    def tick(self) -> None:
        seconds = self.rng.choice([5.0, 10.0, 15.0] if self.busy else [1.0, 5.0, 10.0, 15.0, HEARTBEAT_TIMEOUT + 1])
        self.run(lambda session: advance_clock(session, seconds))
        for job_id in self.waited:
            self.waited[job_id] += seconds

    # --- the invariants ---

    def any_job(self, active: bool = False) -> str | None:
        ids = [job_id for job_id, (status, _) in self.state.items() if not active or status in ACTIVE_STATUSES]
        return self.rng.choice(ids) if ids else None

    def check(self) -> None:
        rows = self.run(lambda session: [row(session, job_id) for job_id in session.scalars(select(Job.id).order_by(Job.created_at))])
        for r in rows:
            job_id = r["id"]
            if r["status"] == JobStatus.QUEUED:
                assert r["worker"] is None and r["heartbeat_at"] is None, f"a queued job with an owner: {r}"
                assert not r["cancel_requested"], f"a queued job with a cancel pending is neither claimable nor ended: {r}"
            elif r["status"] in LEASED_STATUSES:
                assert r["worker"] is not None, f"a running job without an owner: {r}"
            state = (r["status"], r["attempts"])
            if self.state.get(job_id) != state:
                self.state[job_id] = state
                self.resends[job_id] = 0
                self.waited[job_id] = 0.0
            bound = 1 + math.log2(1 + self.waited[job_id] / REQUEUE_AFTER)
            assert self.resends[job_id] <= bound, (
                f"job {job_id} was resent {self.resends[job_id]} times in {self.waited[job_id]:.0f} s without a state change: {r}"
            )


STEPS = {
    "submit": 2,
    "cancel": 1,
    "deliver": 4,
    "redeliver": 1,
    "lose": 1,
    "work": 6,
    "pause": 1,
    "wake": 1,
    "reconcile_read": 3,
    "reconcile_write": 3,
    "tick": 5,
}


@pytest.mark.parametrize("seed", range(16))
def test_random_interleavings_keep_every_job_claimable_or_ended(db, seed):
    rng = random.Random(seed)
    world = World(db, rng, busy=seed % 4 == 0)
    names, weights = zip(*STEPS.items(), strict=True)
    for step in range(300):
        name = rng.choices(names, weights)[0]
        world.log.append(name)
        try:
            getattr(world, name)()
            world.check()
        except AssertionError as err:
            raise AssertionError(f"seed {seed}, step {step} ({name}); steps so far: {world.log[-30:]}\n{err}") from None
    statuses = Counter(world.run(lambda session: list(session.scalars(select(Job.status)))))
    assert sum(statuses.values()) >= 3  # the run did something

    # then the disorder stops (no pauses, no losses): every job must end, within a bounded number of steps
    drain(world)


def drain(world: World) -> None:
    world.zombies.clear()
    for _ in range(400):
        active = [job_id for job_id, (status, _) in world.state.items() if status not in TERMINAL_STATUSES]
        if not active:
            return
        for worker, lease in world.leases.items():
            if lease is not None:
                world.run(
                    lambda s, lease=lease: jobs.succeed(
                        s, lease, result={}, best={}, evaluation={}, warnings=[], execution={}, artifacts=[]
                    )
                )
                world.leases[worker] = None
        world.deliver()
        world.reconcile_read()
        world.reconcile_write()
        world.tick()
        world.check()
    raise AssertionError(f"jobs still not ended after the disorder stopped: {[world.state[j] for j in active]}")


# --- the failures that made the livelock, one by one ------------------------------------------


def add_job(db: Database, **values) -> str:
    with db.transaction() as session:
        job = Job(tenant_id="tn_test", dataset_name="digits", spec={}, max_attempts=3, **values)
        session.add(job)
        session.flush()
        return job.id


def now(db: Database) -> dt.datetime:
    return db.run(jobs.clock)


def test_a_cancel_between_the_reconcilers_read_and_write_ends_the_job(db):
    """The reconciler read a silent worker's job, a cancel landed, then it wrote: the job was queued with a
    cancel pending, refused by every claim and resent forever."""
    job_id = add_job(db, status="running", attempts=1, worker="gone:1", heartbeat_at=now(db) - dt.timedelta(seconds=120))
    snapshot = db.run(lambda session: session.get_one(Job, job_id))
    db.run(lambda session: jobs.request_cancel(session, session.get_one(Job, job_id)))
    assert db.run(lambda session: jobs.release(session, snapshot, "stopped responding")) is None  # the row changed since the read
    assert db.run(lambda session: jobs.due_for_delivery(session, jobs.clock(session), dt.timedelta(seconds=0))) == []
    fresh = db.run(lambda session: session.get_one(Job, job_id))
    assert db.run(lambda session: jobs.release(session, fresh, "stopped responding")) == JobStatus.CANCELLED


def test_a_queued_job_with_a_cancel_pending_is_cancelled_by_its_claim_and_never_resent(db):
    job_id = add_job(db, status="queued", cancel_requested=True)  # as an earlier version could leave it
    assert db.run(lambda session: jobs.due_for_delivery(session, jobs.clock(session), dt.timedelta(seconds=0))) == []
    claim = db.run(lambda session: jobs.claim(session, job_id, "host-a:1", is_stale=lambda j, now: is_stale(j, SETTINGS, now)))
    assert claim is None and db.run(lambda session: session.get_one(Job, job_id).status) == JobStatus.CANCELLED


def test_a_job_its_worker_claimed_but_could_not_start_is_given_back_at_once(db):
    """Claimed before the engine loads: if loading it fails, the job must not wait for its heartbeat to age."""
    from worker.lease import give_back

    job_id = add_job(db, status="queued")
    job = db.run(lambda session: jobs.claim(session, job_id, "host-a:1", is_stale=lambda j, now: is_stale(j, SETTINGS, now)))
    give_back((db, jobs.Lease(job_id, "host-a:1", job.attempts), job), "its worker could not start it (ImportError: boom)")
    back = db.run(lambda session: row(session, job_id))
    assert (back["status"], back["worker"], back["attempts"]) == ("queued", None, 1)
    assert back["phase"] == "re-queued: its worker could not start it (ImportError: boom)"


def test_a_released_job_has_no_owner_and_its_old_worker_cannot_write_it(db):
    job_id = add_job(db, status="queued")
    claim = db.run(lambda session: jobs.claim(session, job_id, "host-a:1", is_stale=lambda j, now: is_stale(j, SETTINGS, now)))
    lease = jobs.Lease(job_id, "host-a:1", claim.attempts)
    db.run(lambda session: advance_clock(session, HEARTBEAT_TIMEOUT + 1))
    stale = db.run(lambda session: session.get_one(Job, job_id))
    assert db.run(lambda session: jobs.release(session, stale, "stopped responding")) == JobStatus.QUEUED
    requeued = db.run(lambda session: row(session, job_id))
    assert requeued["worker"] is None and requeued["heartbeat_at"] is None and requeued["status"] == "queued"
    done = {"result": {}, "best": {}, "evaluation": {}, "warnings": [], "execution": {}, "artifacts": []}
    assert not db.run(lambda session: jobs.succeed(session, lease, **done))
    assert not db.run(lambda session: jobs.heartbeat(session, lease)).owned
    assert db.run(lambda session: row(session, job_id)) == requeued

    # the same worker name claims it again (a new attempt): the first attempt's lease still writes nothing
    again = db.run(lambda session: jobs.claim(session, job_id, "host-a:1", is_stale=lambda j, now: is_stale(j, SETTINGS, now)))
    assert again.attempts == 2
    assert not db.run(lambda session: jobs.finish(session, lease, JobStatus.FAILED, error="from the first attempt"))
    assert db.run(lambda session: jobs.report_progress(session, jobs.Lease(job_id, "host-a:1", 2), {"fraction": 0.1}))


def test_heartbeats_are_judged_by_the_databases_clock_not_the_workers(db, monkeypatch):
    """A worker whose clock runs an hour slow: its heartbeats must not look an hour old to the reconciler."""
    import core.db.jobs as job_transitions
    import core.db.models as models

    job_id = add_job(db, status="queued")
    claim = db.run(lambda session: jobs.claim(session, job_id, "slow:1", is_stale=lambda j, now: is_stale(j, SETTINGS, now)))
    slow = lambda: dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    monkeypatch.setattr(models, "utcnow", slow)
    monkeypatch.setattr(job_transitions, "utcnow", slow)
    assert db.run(lambda session: jobs.heartbeat(session, jobs.Lease(job_id, "slow:1", claim.attempts))).owned
    monkeypatch.undo()
    job = db.run(lambda session: session.get_one(Job, job_id))
    assert not is_stale(job, SETTINGS, now(db))
    assert abs((job.heartbeat_at - now(db)).total_seconds()) < 60


def test_an_unclaimed_job_is_resent_with_a_doubling_interval(db):
    job_id = add_job(db, status="queued")
    requeue_after = dt.timedelta(seconds=REQUEUE_AFTER)
    sent_at = []
    for second in range(0, 3000, 10):
        due = db.run(lambda session: jobs.due_for_delivery(session, jobs.clock(session), requeue_after))
        if job_id in due:
            db.run(lambda session: jobs.mark_enqueued(session, job_id))
            sent_at.append(second)
        db.run(lambda session: advance_clock(session, 10))
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert sent_at[0] == 0 and len(gaps) >= 4
    assert all(wait <= gap <= wait + 10 for gap, wait in zip(gaps[:4], (60, 120, 240, 480), strict=True))  # requeue_after × 1, 2, 4, 8
    assert len(sent_at) <= 1 + math.log2(1 + 3000 / REQUEUE_AFTER) + 1
    assert jobs.resend_interval(50, requeue_after) == jobs.MAX_RESEND_INTERVAL


@pytest.mark.parametrize("round_", range(5))
def test_simultaneous_claims_and_a_cancel_leave_one_owner_or_none(db, round_):
    """Real concurrency, one transaction per thread at the same instant: eight workers claim a queued job while
    the API cancels it. One claim wins and the job runs with the cancel flagged, or the cancel wins and no
    claim does; never two owners, never a queued job with a cancel pending."""
    import threading

    job_id = add_job(db, status="queued")
    barrier = threading.Barrier(9)
    won: list[str] = []

    def worker(name: str) -> None:
        barrier.wait()
        if db.run(lambda session: jobs.claim(session, job_id, name, is_stale=lambda j, now: is_stale(j, SETTINGS, now))):
            won.append(name)

    def cancel() -> None:
        barrier.wait()
        db.run(lambda session: jobs.request_cancel(session, session.get_one(Job, job_id)))

    threads = [threading.Thread(target=worker, args=(f"host-{i}:{i}",)) for i in range(8)] + [threading.Thread(target=cancel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    final = db.run(lambda session: row(session, job_id))
    assert len(won) <= 1 and final["cancel_requested"]
    if won:
        assert (final["status"], final["worker"], final["attempts"]) == ("running", won[0], 1)
    else:
        assert (final["status"], final["worker"], final["attempts"]) == ("cancelled", None, 0)
