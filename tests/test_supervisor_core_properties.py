"""Random interleavings of what workers, clients, the fork server, the clock and the
operator can do, against the supervisor's core: its promises hold in every order."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol.ipc import Heartbeat
from protocol.signaling import SessionEnd
from supervisor.events import ForkServerDown, ForkServerUp, ForkWorker, SendSignal, StopRequested
from supervisor.pool import WorkerState
from supervisor.sessions import ACTIVE, ENDED, LIVE
from supervisor.signal_messages import DUPLICATE
from tests.supervisor_harness import DEVICE, Stage, assigned, of, session_ends, session_id

POOL_SIZE = 2
MAX_SESSIONS = 3
MAX_WORKERS = 5

requests = st.tuples(st.just("request"), st.integers(0, 11), st.sampled_from(["c1", "c2", "c3"]))
starts = st.tuples(st.sampled_from(["spawn", "hello"]), st.integers(0, 5))
ops = st.one_of(
    requests,
    requests,
    requests,
    requests,
    starts,
    starts,
    starts,
    st.tuples(st.just("connected"), st.integers(0, 5)),
    st.tuples(st.just("ended"), st.integers(0, 5)),
    st.tuples(st.just("released"), st.integers(0, 5)),
    st.tuples(st.just("released"), st.integers(0, 5)),
    st.tuples(st.just("released"), st.integers(0, 5)),
    st.tuples(st.just("wedge"), st.integers(0, 5)),
    st.tuples(
        st.just("exit"),
        st.integers(0, 5),
        st.sampled_from([None, 0, 1, -9, -11]),
        st.booleans(),
    ),
    st.tuples(st.just("left"), st.integers(0, 11)),
    st.tuples(st.just("kill"), st.integers(0, 11)),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.6, 1.0, 2.5, 6.0, 16.0])),
    st.tuples(st.just("fork_server"), st.booleans()),
)


def pick(items: list[str], index: int) -> str | None:
    return items[index % len(items)] if items else None


def apply(
    stage: Stage,
    op: tuple[Any, ...],
    exited: set[str],
    wedged: set[str],
    released: Counter[str] | None = None,
) -> None:
    kind = op[0]
    pool = [w for w in stage.core.pool]
    if kind == "request":
        stage.request(session_id(op[1]), op[2])
    elif kind == "spawn":
        if (worker := pick(stage.forked(), op[1])) is not None and worker in stage.core.pool:
            stage.spawn(worker)
    elif kind == "hello":
        starting = [w.id for w in pool if w.starting and w.pid is not None]
        if (worker := pick(starting, op[1])) is not None:
            stage.hello(worker)
    elif kind in ("connected", "ended"):
        owning = [w.id for w in pool if w.session is not None and w.state is WorkerState.BUSY]
        if (worker := pick(owning, op[1])) is not None:
            session = stage.worker(worker).session
            assert session is not None
            if kind == "connected":
                stage.connected(worker, session)
            else:
                stage.ended(worker, session)
    elif kind == "released":  # a worker answers the release of its given-up session
        asked = [w.id for w in pool if w.releasing is not None and w.id not in exited]
        if (worker := pick(asked, op[1])) is not None:
            session = stage.worker(worker).releasing
            assert session is not None
            if stage.worker(worker).state is WorkerState.BUSY and released is not None:
                released[worker] += 1
            stage.released(worker, session)
    elif kind == "wedge":  # it stops answering heartbeats
        if (worker := pick([w.id for w in pool], op[1])) is not None:
            wedged.add(worker)
    elif kind == "exit":
        alive = [w.id for w in pool if w.pid is not None and w.id not in exited]
        if (worker := pick(alive, op[1])) is not None:
            exited.add(worker)
            stage.exit(worker, op[2], report_first=op[3])
    elif kind == "left":
        stage.client_left(session_id(op[1]))
    elif kind == "kill":
        stage.control("kill", session=session_id(op[1]))
    elif kind == "advance":
        left = op[1]
        while left > 0:  # live workers beat once a second
            stage.advance(min(left, 1.0))
            left -= 1.0
            for worker in list(stage.core.pool):
                if worker.id not in wedged and worker.id not in exited and not worker.starting:
                    stage.send(worker.id, Heartbeat())
    elif kind == "fork_server":
        stage.feed(ForkServerUp(4000) if op[1] else ForkServerDown(-9))
    elif kind == "stop":
        stage.feed(StopRequested(op[1]))


def check(
    stage: Stage,
    requested: set[str],
    ended: dict[str, str],
    stopped_at: int | None,
    released: Counter[str],
) -> None:
    core = stage.core
    # One worker, one session at a time: a second one only after it released the first.
    for worker, count in Counter(w for w, _ in assigned(stage.out)).items():
        assert count <= 1 + released[worker], f"{worker} assigned {count} times"
    for worker in core.pool:
        live = [r for r in core.sessions if r.worker == worker.id and r.state in LIVE]
        assert len(live) <= 1
    reserved = [w.reserved_for for w in core.pool if w.state is WorkerState.RESERVED]
    assert len(reserved) == len(set(reserved))
    # No session lost: live, or ended with a reason, or told why at the client.
    for row in core.sessions:
        assert row.state in ACTIVE or row.state in ENDED
        if row.state in ENDED:
            assert row.reason, row
            ended[row.id] = row.reason
    told = session_ends(stage.out)
    # A given-up session's client is told once, and nothing after (a duplicate
    # request for the same id is refused on its own, whatever it was; a refused
    # request leaves no row, so its id may be asked for again).
    tellings: dict[str, list[str]] = {}
    for action in of(SendSignal, stage.out):
        if isinstance(action.message, SessionEnd) and action.message.reason != DUPLICATE:
            tellings.setdefault(action.message.session, []).append(action.message.reason)
    for session, reasons in tellings.items():
        given_up = [n for n, r in enumerate(reasons) if r.endswith("given up")]
        assert not given_up or given_up[0] == len(reasons) - 1, (session, reasons)
    for worker in core.pool:
        if worker.releasing is not None:  # its session is over, the slot free
            row = core.sessions.get(worker.releasing)
            assert row is None or row.state in ENDED
    for session in requested:
        assert session in core.sessions or session in ended or session in told, session
    # Limits.
    assert core.sessions.active(DEVICE) <= MAX_SESSIONS
    # Each worker of a given-up session (released, or a cold start joining the pool)
    # may make the pool one larger than its size; never the processes more than the
    # ceiling.
    given_up = sum(1 for r in ended.values() if r.endswith("given up"))
    assert core.pool.available() <= POOL_SIZE + given_up
    assert core.pool.alive() <= MAX_WORKERS
    # A cold start not given up on waits for its own session, which still counts against the
    # limit (once stopped, one not forked yet outlives its session: nothing is left to do).
    # One given up on (killed at its spawn timeout, its session ended) only awaits its exit,
    # like a pool worker given up on, which available() leaves out too.
    waiting = [w for w in core.pool if w.state is WorkerState.RESERVED and w.kill_reason is None]
    for worker in waiting:
        row = core.sessions.get(worker.reserved_for)
        assert core.stopped or (row is not None and row.state in ACTIVE), (worker, row)
    assert len(waiting) <= MAX_SESSIONS
    owning = [w for w in core.pool if core.sessions.of_worker(w.id)]
    assert len(owning) <= MAX_SESSIONS
    if stopped_at is not None:
        assert not [a for a in stage.out[stopped_at:] if isinstance(a, ForkWorker)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(ops, min_size=20, max_size=80),
    st.integers(0, 2**16),
    st.integers(10, 100),
    st.sampled_from([0.0, 2.0]),
)
def test_random_interleavings_keep_the_cores_promises(
    script: list[tuple[Any, ...]], seed: int, stop_at: int, drain: float
) -> None:
    play(script, seed, stop_at, drain)


#: A slot hog's game: negotiations left unanswered while time passes, workers
#: released (or connecting, ending, exiting as the release reaches them).
hog_ops = st.one_of(
    requests,
    requests,
    starts,
    st.tuples(st.just("released"), st.integers(0, 5)),
    st.tuples(st.just("released"), st.integers(0, 5)),
    st.tuples(st.just("connected"), st.integers(0, 5)),
    st.tuples(st.just("ended"), st.integers(0, 5)),
    st.tuples(st.just("exit"), st.integers(0, 5), st.sampled_from([None, 0, -9]), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 2.5, 6.0])),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(hog_ops, min_size=20, max_size=80),
    st.integers(0, 2**16),
    st.integers(10, 100),
    st.sampled_from([0.0, 2.0]),
)
def test_random_give_ups_and_releases_keep_the_cores_promises(
    script: list[tuple[Any, ...]], seed: int, stop_at: int, drain: float
) -> None:
    play(script, seed, stop_at, drain)


def play(script: list[tuple[Any, ...]], seed: int, stop_at: int, drain: float) -> None:
    stage = Stage(
        seed=seed,
        pool_size=POOL_SIZE,
        max_sessions=MAX_SESSIONS,
        max_workers=MAX_WORKERS,
        max_restarts=2,
        negotiation_timeout=5.0,
    )
    stage.boot()
    requested: set[str] = set()
    ended: dict[str, str] = {}
    exited: set[str] = set()
    wedged: set[str] = set()
    released: Counter[str] = Counter()
    stopped_at: int | None = None
    script = list(script)
    if stop_at < len(script):  # stop somewhere after the start, or not at all
        script.insert(stop_at, ("stop", drain))
    for op in script:
        if op[0] == "request":
            requested.add(session_id(op[1]))
        if op[0] == "stop":
            stopped_at = len(stage.out)
        apply(stage, op, exited, wedged, released)
        check(stage, requested, ended, stopped_at, released)
    deadline = stage.core.next_deadline()
    assert deadline is None or deadline >= stage.now
    event(f"assigned {min(len(assigned(stage.out)), 4)}+")
    event(f"crashes {min(stage.core.counters['worker_crashes'], 2)}+")
    event(f"ended {min(len(ended), 3)}+")
    event(f"released {min(sum(released.values()), 2)}+")
    reused = [n for n in Counter(w for w, _ in assigned(stage.out)).values() if n > 1]
    event(f"workers reused {min(len(reused), 2)}+")


@settings(max_examples=100, deadline=None)
@given(st.lists(ops, min_size=10, max_size=50), st.integers(0, 2**16))
def test_every_session_ends_once_all_workers_exit_and_time_passes(
    script: list[tuple[Any, ...]], seed: int
) -> None:
    stage = Stage(
        seed=seed, pool_size=POOL_SIZE, max_sessions=MAX_SESSIONS, negotiation_timeout=5.0
    )
    stage.boot()
    exited: set[str] = set()
    wedged: set[str] = set()
    for op in script:
        apply(stage, op, exited, wedged)
    stage.feed(StopRequested(1.0))
    for _ in range(30):  # each process dies when told to, or when it is killed
        for worker in list(stage.core.pool):
            if worker.pid is not None and worker.id not in exited:
                exited.add(worker.id)
                stage.exit(worker.id, -15)
        stage.advance(1.0)
    for row in stage.core.sessions:
        assert row.state in ENDED, row
        assert row.reason
    assert stage.core.stopped
