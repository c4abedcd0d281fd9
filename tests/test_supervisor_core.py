"""The supervisor's core, in memory with a fake clock: pool, sessions, exits, stop."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.forkserver import describe_exit
from protocol.ice import IceConfig, IceServer
from protocol.ipc import (
    Assign,
    Drain,
    Heartbeat,
    IceUpdate,
    Relay,
    Release,
    Stop,
    encode_ipc,
)
from protocol.signaling import (
    Answer,
    Candidate,
    IceServers,
    Offer,
    Revoke,
    SessionEnd,
    encode_signaling,
)
from protocol.supervision import SessionState
from supervisor.core import EXIT_REPORT_WAIT, SPAWN_TIMEOUT, STOP_GRACE
from supervisor.events import (
    ConfigureForkServer,
    ForkServerDown,
    ForkServerUp,
    ForkWorker,
    SendSignal,
    SendToWorker,
    SignalReceived,
    Started,
    StartForkServer,
    Stopped,
    Stopping,
    StopRequested,
    WorkerFrames,
    WorkerGone,
    WorkerSpawned,
)
from supervisor.pool import (
    SHOWN_AS,
    WORKER_TRANSITIONS,
    IllegalWorkerTransition,
    WorkerEvent,
    WorkerState,
    worker_transition,
)
from supervisor.signal_messages import DUPLICATE
from tests.supervisor_harness import (
    DEVICE,
    T0,
    ForgetWorker,
    KillProcess,
    Stage,
    WatchWorker,
    assigned,
    heartbeats,
    of,
    relayed,
    releases,
    session_ends,
    session_id,
)

W, WE = WorkerState, WorkerEvent

#: The worker lifecycle, written out once more: the table must say exactly this.
EXPECTED = {
    (W.SPAWNING, WE.HELLO): W.IDLE,
    (W.RESERVED, WE.HELLO): W.BUSY,
    (W.IDLE, WE.TAKE): W.BUSY,
    (W.BUSY, WE.ENDED): W.EXITING,
    (W.BUSY, WE.RELEASED): W.IDLE,
    (W.RESERVED, WE.RELEASED): W.SPAWNING,
    (W.EXITING, WE.ENDED): W.EXITING,
    (W.GONE, WE.ENDED): W.GONE,
    (W.SPAWNING, WE.EXIT): W.GONE,
    (W.RESERVED, WE.EXIT): W.GONE,
    (W.IDLE, WE.EXIT): W.GONE,
    (W.BUSY, WE.EXIT): W.GONE,
    (W.EXITING, WE.EXIT): W.GONE,
}


@pytest.mark.parametrize("state", list(WorkerState))
@pytest.mark.parametrize("event", list(WorkerEvent))
def test_every_worker_transition_is_in_the_table_or_refused(
    state: WorkerState, event: WorkerEvent
) -> None:
    if (state, event) in EXPECTED:
        assert worker_transition(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(IllegalWorkerTransition, match=f"from {state.value} on {event.value}"):
            worker_transition(state, event)
    assert WORKER_TRANSITIONS == EXPECTED
    assert set(SHOWN_AS) == set(WorkerState)


def busy_stage(**tuning: object) -> tuple[Stage, str, str]:
    """A booted stage with one running session; returns (stage, session, worker)."""
    stage = Stage(**tuning)  # type: ignore[arg-type]
    stage.boot()
    session = session_id(1)
    stage.request(session)
    stage.start_forked()  # the refill, or the cold start of pool_size=0
    worker = stage.worker_of(session)
    stage.connected(worker, session)
    return stage, session, worker


# -- session ownership (PROTOCOL.md §1.4) ------------------------------------------------------


def test_only_the_owner_of_a_session_reaches_its_worker() -> None:
    """The hijack of issue 9: X re-requests B's session id, then ends it."""
    stage, session, worker = busy_stage()
    assert session_ends(stage.request(session, client="x")) == {session: DUPLICATE}
    for_x = [
        stage.end(session, client="x"),
        stage.answer(session, client="x"),
        stage.feed(SignalReceived(DEVICE, Candidate(session, None, "x"))),
        stage.client_left(session, client="x"),
        # No client stamped (a server older than ownership): not the owner either.
        stage.feed(SignalReceived(DEVICE, SessionEnd(session, "bye"))),
    ]
    # Exactly what a message for a session that does not exist gets.
    assert stage.end(session_id(99), client="x") == []
    assert for_x == [[]] * 5
    row = stage.row(session)
    assert (row["state"], row["client"], row["reason"]) == ("running", "c1", None)
    assert stage.worker(worker).state is WorkerState.BUSY
    assert [type(a).__name__ for a in stage.end(session, client="c1")] == ["SendToWorker"]


def test_a_duplicate_request_from_the_owner_is_refused_too() -> None:
    stage, session, _ = busy_stage()
    assert session_ends(stage.request(session)) == {session: DUPLICATE}
    assert stage.row(session)["state"] == "running"


def test_a_revoked_client_loses_every_session_on_the_device() -> None:
    stage, session, worker = busy_stage(pool_size=2)
    stage.request(session_id(2), client="bob")
    bob_worker = stage.worker_of(session_id(2))
    actions = stage.feed(SignalReceived(DEVICE, Revoke("c1", "token revoked")))
    assert SendToWorker(worker, Stop("client token revoked")) in actions
    assert all(a.worker != bob_worker for a in of(SendToWorker, actions))
    assert stage.row(session)["state"] == "stopping"
    assert stage.row(session)["reason"] == "client token revoked"
    stage.ended(worker, session, "client token revoked")
    assert stage.row(session)["state"] == "exited"
    assert stage.row(session_id(2))["state"] == "starting"


# -- fair admission (README, "Admission") -------------------------------------------------------


def test_one_client_may_hold_only_a_few_negotiations() -> None:
    stage = Stage(pool_size=2, max_negotiating_per_client=2)
    stage.boot()
    for n in range(2):
        assert session_ends(stage.request(session_id(n), client="hog")) == {}
    refused = session_ends(stage.request(session_id(2), client="hog"))
    assert refused == {session_id(2): "too many sessions of hog negotiating (at most 2)"}
    assert session_ends(stage.request(session_id(3), client="alice")) == {}
    stage.start_forked()
    stage.connected(stage.worker_of(session_id(0)), session_id(0))
    # Once one of its sessions runs, the client may start another.
    assert session_ends(stage.request(session_id(4), client="hog")) == {}


GIVEN_UP = "negotiation not done in 5 s; given up"


def given_up_stage(**tuning: Any) -> tuple[Stage, str, str]:
    """A booted stage whose first session's negotiation was just given up;
    returns (stage, session, worker), the worker asked to release it."""
    # Heartbeats are not the subject: the fake workers stay silent for longer than 5 s.
    tuning = {"pool_size": 1, "negotiation_timeout": 5.0, "heartbeat_timeout": 60.0} | tuning
    stage = Stage(**tuning)
    stage.boot()
    session = session_id(1)
    stage.request(session, client="hog")
    stage.start_forked()  # the refill
    worker = stage.worker_of(session)
    stage.advance(5.0)
    return stage, session, worker


def test_an_unanswered_negotiation_is_given_up_and_frees_its_slot() -> None:
    stage = Stage(pool_size=1, max_negotiating_per_client=1, negotiation_timeout=5.0)
    stage.boot()
    session = session_id(1)
    stage.request(session, client="hog")
    worker = stage.worker_of(session)
    assert session_ends(stage.advance(4.9)) == {}
    actions = stage.advance(0.2)
    assert session_ends(actions) == {session: GIVEN_UP}
    assert SendToWorker(worker, Release(session, GIVEN_UP)) in actions
    # Ended at once, with the reason: the slot is free before the worker answers.
    assert stage.row(session)["state"] == "exited"
    assert stage.row(session)["reason"] == GIVEN_UP
    assert session_ends(stage.request(session_id(2), client="hog")) == {}


def test_a_released_worker_goes_back_to_the_pool_and_serves_the_next_session() -> None:
    stage, session, worker = given_up_stage()
    assert releases(stage.out) == [(worker, session)]
    assert stage.core.pool.available() == 2  # the refill, and the worker coming back
    stage.advance(1.0)  # its answer takes a while: neither killed nor replaced meanwhile
    assert not of(KillProcess, stage.out) and len(of(ForkWorker, stage.out)) == 2
    forks = len(of(ForkWorker, stage.out))
    actions = stage.released(worker, session)
    assert stage.worker(worker).state is W.IDLE and stage.worker(worker).session is None
    assert stage.core.counters["bad_worker_messages"] == 0
    assert session_ends(actions) == {}  # its client was told once, at the give-up
    assert stage.control("status")["pool"]["idle"] == 2
    # The next session takes it (the first idle worker), and nothing is forked for it.
    actions = stage.request(session_id(2))
    assert assigned(actions) == [(worker, session_id(2))]
    assert len(of(ForkWorker, stage.out)) == forks
    stage.connected(worker, session_id(2))
    assert stage.row(session_id(2))["state"] == "running"
    assert stage.row(session)["state"] == "exited"  # the old row is not its again
    stage.ended(worker, session_id(2))
    stage.exit(worker, 0)
    assert stage.row(session_id(2))["reason"] == "peer hung up"
    assert stage.row(session)["reason"] == GIVEN_UP
    assert stage.core.counters["worker_crashes"] == 0


def test_a_released_worker_gets_the_ice_servers_issued_while_it_was_busy() -> None:
    stage, session, worker = given_up_stage()
    turn = IceServer("turn:127.0.0.1:3478", "1767229200:dev-a", "c2VjcmV0")
    stage.feed(SignalReceived(DEVICE, IceServers((turn,))))
    assert not [a for a in stage.out if a == SendToWorker(worker, IceUpdate.of(stage.core.ice()))]
    actions = stage.released(worker, session)
    assert SendToWorker(worker, IceUpdate.of(stage.core.ice())) in actions


def test_a_worker_that_connected_just_before_the_release_ends_and_exits() -> None:
    """The race: the channel opened as the give-up fired. The client was told the
    session is over, so the worker ends it without a word to the client and exits."""
    stage, session, worker = given_up_stage()
    stage.connected(worker, session)  # sent before the release reached it
    assert stage.row(session)["state"] == "exited"  # too late: it stays given up
    stage.ended(worker, session, GIVEN_UP)  # its answer to the release
    assert stage.worker(worker).state is W.EXITING
    forks = len(of(ForkWorker, stage.out))
    actions = stage.exit(worker, 0)
    assert len(of(ForkWorker, actions)) == 0  # the refill made at the take still stands
    assert worker not in stage.core.pool
    assert stage.row(session)["reason"] == GIVEN_UP
    assert [a for a in stage.out if isinstance(a, SendSignal)] == [
        SendSignal(DEVICE, SessionEnd(session, GIVEN_UP))
    ]
    assert stage.core.counters["worker_crashes"] == 0
    # A late "released" from it (it cannot send one after "ended") would be refused.
    assert len(of(ForkWorker, stage.out)) == forks


@pytest.mark.parametrize("code", [0, 1, -11])
def test_a_worker_that_exits_instead_of_releasing_is_replaced(code: int) -> None:
    stage, session, worker = given_up_stage()
    forks = len(of(ForkWorker, stage.out))
    actions = stage.exit(worker, code)
    assert worker not in stage.core.pool
    assert stage.row(session)["reason"] == GIVEN_UP  # ended at the give-up, never a crash
    assert stage.core.counters["worker_crashes"] == 0
    assert session_ends(actions) == {}
    assert len(of(ForkWorker, stage.out)) == forks  # pool_size 1: the refill is enough
    assert stage.core.pool.available() == 1


def test_a_worker_that_never_answers_the_release_is_killed() -> None:
    stage, session, worker = given_up_stage()
    stage.advance(STOP_GRACE)
    assert KillProcess(stage.pids[worker], hard=True) in stage.out
    stage.exit(worker, -9)
    assert stage.row(session)["reason"] == GIVEN_UP
    assert stage.core.counters["worker_crashes"] == 0


def test_released_is_accepted_only_for_the_session_being_released() -> None:
    stage, session, worker = busy_stage(negotiation_timeout=5.0)
    stage.released(worker, session)  # running, never asked to release
    assert stage.worker(worker).state is W.BUSY
    stage, session, worker = given_up_stage()
    stage.released(worker, session_id(9))
    assert stage.worker(worker).state is W.BUSY
    assert stage.core.counters["bad_worker_messages"] == 1
    stage.released(worker, session)
    stage.released(worker, session)  # twice: it is idle already
    assert stage.worker(worker).state is W.IDLE
    assert stage.core.counters["bad_worker_messages"] == 2


def test_released_workers_respect_the_worker_ceiling_and_end_refusals() -> None:
    """At max_workers a hog's given-up sessions hold every process; released, they
    serve the next sessions with no fork, and the ceiling is never crossed."""
    stage = Stage(pool_size=1, max_workers=2, negotiation_timeout=5.0)
    stage.boot()
    stage.request(session_id(1), client="hog")
    stage.start_forked()
    stage.request(session_id(2), client="hog2")
    assert stage.core.pool.alive() == 2
    refused = session_ends(stage.request(session_id(3), client="alice"))
    assert refused == {session_id(3): "device is busy: 2 worker processes"}
    stage.advance(5.0)
    forks = len(of(ForkWorker, stage.out))
    for worker, session in releases(stage.out):
        stage.released(worker, session)
    assert stage.core.pool.count("idle") == 2 and stage.core.pool.alive() == 2
    for n in (4, 5):
        assert session_ends(stage.request(session_id(n), client="alice")) == {}
        assert stage.core.pool.alive() <= 2
    assert len(of(ForkWorker, stage.out)) == forks
    assert {s for _, s in assigned(stage.out)} >= {session_id(4), session_id(5)}


def test_a_worker_released_while_the_supervisor_stops_is_terminated() -> None:
    stage, session, worker = given_up_stage()
    stage.feed(StopRequested(5.0))
    assert SendToWorker(worker, Drain(5.0)) in stage.out
    actions = stage.released(worker, session)
    assert KillProcess(stage.pids[worker], hard=False) in actions


def test_a_session_that_connects_in_time_is_not_given_up() -> None:
    stage, session, _ = busy_stage(negotiation_timeout=5.0)
    assert session_ends(stage.advance(60.0)) == {}
    assert stage.row(session)["state"] == "running"


def test_never_more_workers_than_the_ceiling() -> None:
    stage = Stage(pool_size=1, max_workers=3, max_negotiating_per_client=64)
    stage.boot()
    refused: dict[str, str] = {}
    for n in range(10):
        refused |= session_ends(stage.request(session_id(n), client="hog"))
        stage.start_forked()
        assert stage.core.pool.alive() <= 3
    assert len(of(ForkWorker, stage.out)) == 3
    assert set(refused.values()) == {"device is busy: 3 worker processes"}
    assert len(refused) == 7


# -- the pool -----------------------------------------------------------------------------------


def test_boot_fills_the_pool_and_watches_each_worker() -> None:
    stage = Stage(pool_size=3)
    assert stage.core.next_deadline() == T0 + 1.0  # the heartbeat tick
    stage.feed(Started())
    assert stage.forked() == []  # no fork server yet: nothing asked
    stage.boot()
    workers = list(stage.pids)
    assert len(workers) == 3
    assert [a.worker for a in of(WatchWorker, stage.out)] == workers
    assert {stage.worker(w).state for w in workers} == {W.IDLE}
    status = stage.control("status")
    assert status["pool"] == {"idle": 3, "spawning": 0, "busy": 0, "target": 3}
    assert status["ready"] is True and status["fork_server_pid"] == 4000


def test_a_session_takes_an_idle_worker_and_the_pool_is_refilled() -> None:
    stage = Stage()
    stage.boot()
    first = next(iter(stage.pids))
    actions = stage.request(session_id(1))
    assert assigned(actions) == [(first, session_id(1))]
    assert stage.worker(first).state is W.BUSY
    assert len(of(ForkWorker, actions)) == 1  # one replacement
    assert stage.row(session_id(1))["worker_pid"] == stage.pids[first]


def test_one_worker_is_never_offered_to_two_sessions() -> None:
    """The race the benchmark found: two requests while one idle worker is left."""
    stage = Stage(pool_size=1)
    stage.boot()
    stage.request(session_id(1))
    stage.request(session_id(2))  # no idle worker: a reserved one is forked
    reserved = [w for w in stage.forked() if stage.worker(w).state is W.RESERVED]
    assert len(reserved) == 1
    stage.request(session_id(3))  # the reserved worker is not on offer either
    stage.start_forked()
    pairs = assigned(stage.out)
    workers = [w for w, _ in pairs]
    sessions = [s for _, s in pairs]
    assert len(set(workers)) == len(workers) == 3
    assert sorted(sessions) == [session_id(1), session_id(2), session_id(3)]
    assert stage.core.pool.count("idle") == 1  # the refill, given to nobody


def test_signaling_before_the_worker_is_ready_is_relayed_after_assign_in_order() -> None:
    stage = Stage(pool_size=0)
    stage.boot()
    session = session_id(1)
    stage.request(session)
    stage.answer(session)
    (worker,) = stage.forked()
    stage.spawn(worker)
    actions = stage.hello(worker)
    sent = [a.message for a in actions if hasattr(a, "message")]
    assert [type(m).__name__ for m in sent] == ["Assign", "Relay"]
    assert relayed(actions) == [(worker, encode_signaling(Answer(session, "v=0 answer", "c1")))]


def test_a_worker_relays_only_its_own_sessions_offer_and_candidates() -> None:
    stage, session, worker = busy_stage()
    offer = encode_signaling(Offer(session, "v=0 offer"))
    assert session_ends(stage.send(worker, Relay(session, offer))) == {}
    assert stage.out[-1].message == Offer(session, "v=0 offer")  # type: ignore[union-attr]
    other = session_id(9)
    before = stage.core.counters["bad_worker_messages"]
    stage.send(worker, Relay(other, encode_signaling(Candidate(other, None))))
    stage.send(worker, Relay(session, encode_signaling(Answer(session, "v=0"))))
    stage.feed(WorkerFrames((b"w-00000000000000ff", encode_ipc(Stop("x")))))
    stage.feed(WorkerFrames((worker.encode(), b"\xc1garbage")))
    stage.feed(WorkerFrames((worker.encode(),)))
    assert stage.core.counters["bad_worker_messages"] == before + 5


# -- exits --------------------------------------------------------------------------------------


def test_an_exit_seen_before_the_last_ended_is_a_clean_end() -> None:
    """The other race: the pidfd fires, then the worker's "ended" is read."""
    stage, session, worker = busy_stage()
    stage.exit(worker, None)  # pidfd only
    assert stage.worker(worker).state is W.GONE
    assert stage.row(session)["state"] == "running"  # judgement waits
    stage.ended(worker, session, "client hung up")
    actions = stage.exit(worker, 0, report_first=True)  # the report comes late
    row = stage.row(session)
    assert (row["state"], row["reason"]) == ("exited", "client hung up")
    assert stage.core.counters["worker_crashes"] == 0
    assert session_ends(stage.out) == {}
    assert worker not in stage.core.pool
    assert of(ForgetWorker, actions)


def test_exit_code_0_without_ended_is_a_clean_end() -> None:
    stage, session, worker = busy_stage()
    stage.exit(worker, 0, report_first=True)
    assert stage.row(session)["reason"] == "worker exited"
    assert stage.core.counters["worker_crashes"] == 0


def test_no_exit_report_is_judged_after_the_wait_as_a_crash() -> None:
    stage, session, worker = busy_stage()
    stage.exit(worker, None)
    stage.advance(EXIT_REPORT_WAIT - 0.01)
    assert stage.row(session)["state"] == "running"
    stage.advance(0.02)
    assert stage.row(session)["reason"] == "worker crashed (exited)"
    assert session_ends(stage.out) == {session: "worker crashed (exited); reconnect"}


def test_a_crash_ends_only_its_session_and_counts_for_its_lineage() -> None:
    stage = Stage()
    stage.boot()
    stage.request(session_id(1), "c1")
    stage.request(session_id(2), "c2")
    crashed = stage.worker_of(session_id(1))
    stage.exit(crashed, -11)
    assert stage.row(session_id(1))["reason"] == "worker crashed (killed by SIGSEGV)"
    assert stage.row(session_id(2))["state"] == "starting"
    assert stage.core.counters["worker_crashes"] == 1
    stage.request(session_id(3), "c1")
    stage.request(session_id(4), "c2")
    assert stage.row(session_id(3))["restarts"] == 1
    assert stage.row(session_id(4))["restarts"] == 0


@pytest.mark.parametrize("code", [-9, 1, None])
def test_a_worker_exiting_in_each_state(code: int | None) -> None:
    stage = Stage(pool_size=1)
    stage.boot()
    idle = next(iter(stage.pids))
    # idle: forgotten, replaced; no session touched
    actions = stage.exit(idle, code)
    assert idle not in stage.core.pool and len(of(ForkWorker, actions)) == 1
    # spawning (pid known, no hello): same
    (spawning,) = stage.forked()
    stage.spawn(spawning)
    stage.exit(spawning, code)
    assert spawning not in stage.core.pool
    (fresh,) = stage.forked()
    stage.spawn(fresh)
    stage.hello(fresh)
    # reserved: its session ends at once, told why
    stage.request(session_id(1))  # takes `fresh`
    stage.request(session_id(2))  # forks a reserved one
    reserved = next(w for w in stage.forked() if stage.worker(w).state is W.RESERVED)
    stage.spawn(reserved)
    stage.exit(reserved, code)
    row = stage.row(session_id(2))
    assert row["state"] == "exited" and row["reason"].startswith("worker did not start")
    assert session_id(2) in session_ends(stage.out)
    # busy: a crash unless it exited 0
    stage.exit(fresh, code, report_first=True)
    stage.advance(EXIT_REPORT_WAIT)
    assert stage.row(session_id(1))["reason"].startswith("worker crashed")
    # exiting (said ended): a clean end whatever the code
    stage.start_forked()
    stage.request(session_id(3), "c3")  # c1 backs off after its crash
    worker = stage.worker_of(session_id(3))
    stage.ended(worker, session_id(3), "done")
    assert stage.worker(worker).state is W.EXITING
    stage.exit(worker, code)
    stage.advance(EXIT_REPORT_WAIT)
    assert stage.row(session_id(3))["reason"] == "done"
    assert stage.core.counters["worker_crashes"] == 1
    # gone twice: the second report changes nothing
    assert stage.feed(WorkerGone(worker)) == []


def test_a_worker_that_never_starts_is_given_up_and_retried_with_backoff() -> None:
    stage = Stage(pool_size=1)
    stage.feed(ForkServerUp(4000))
    (never,) = stage.forked()
    actions = stage.advance(SPAWN_TIMEOUT + 0.01)
    assert never not in stage.core.pool  # no pid: nothing to kill, forgotten
    assert of(ForkWorker, actions) == []  # not at once: after the pool's backoff
    assert len(of(ForkWorker, stage.advance(0.5))) == 1
    # a late "spawned" for the forgotten worker: that process is killed
    actions = stage.feed(WorkerSpawned(never, 7777))
    assert actions == [KillProcess(7777, hard=True)]


def test_a_cold_start_that_times_out_ends_its_session() -> None:
    stage = Stage(pool_size=0, negotiation_timeout=60.0)
    stage.boot()
    stage.request(session_id(1))
    (worker,) = stage.forked()
    stage.spawn(worker)
    stage.advance(SPAWN_TIMEOUT + 0.01)
    assert KillProcess(stage.pids[worker], hard=True) in stage.out
    assert session_ends(stage.out) == {session_id(1): "worker did not start: TimeoutError"}
    stage.hello(worker)  # too late: it is being killed, never given anything
    assert assigned(stage.out) == []


@pytest.mark.parametrize("says_hello", [True, False])
def test_a_cold_start_given_up_joins_the_pool_and_its_client_is_told_once(
    says_hello: bool,
) -> None:
    stage = Stage(pool_size=0, negotiation_timeout=5.0)
    stage.boot()
    stage.request(session_id(1))
    (worker,) = stage.forked()
    stage.spawn(worker)
    stage.advance(5.0)
    assert stage.row(session_id(1))["reason"] == GIVEN_UP
    assert releases(stage.out) == []  # nothing to release: it has no session yet
    assert stage.worker(worker).state is W.SPAWNING
    if says_hello:
        stage.hello(worker)
        assert stage.worker(worker).state is W.IDLE
        assert assigned(stage.request(session_id(2))) == [(worker, session_id(2))]
        assert len(of(ForkWorker, stage.out)) == 1
    else:
        stage.advance(SPAWN_TIMEOUT)  # its start times out: the client is not told again
        assert KillProcess(stage.pids[worker], hard=True) in stage.out
        assert assigned(stage.out) == []
    assert [a.message for a in of(SendSignal, stage.out)] == [SessionEnd(session_id(1), GIVEN_UP)]


def test_a_cold_start_given_up_on_holds_no_place_while_its_exit_is_awaited() -> None:
    stage = Stage(pool_size=0, max_sessions=1, negotiation_timeout=60.0)
    stage.boot()
    stage.request(session_id(1))
    (dying,) = stage.forked()
    stage.spawn(dying)
    stage.advance(SPAWN_TIMEOUT + 0.01)
    assert stage.row(session_id(1))["state"] == "exited"
    assert stage.worker(dying).state is W.RESERVED  # killed; reserved until its exit is seen
    stage.request(session_id(2))  # the limit counts sessions, not processes being killed
    (fresh,) = stage.forked()
    assert stage.worker(fresh).reserved_for == session_id(2)
    stage.request(session_id(3))
    assert session_ends(stage.out)[session_id(3)] == "device is at its session limit"
    stage.exit(dying, -9)
    assert dying not in stage.core.pool
    stage.spawn(fresh)
    stage.hello(fresh)
    assert assigned(stage.out) == [(fresh, session_id(2))]


def test_fork_server_death_fails_cold_starts_and_restarts_it_after_backoff() -> None:
    stage = Stage(pool_size=0)
    stage.boot()
    actions = stage.feed(ForkServerDown(-9))
    assert not of(StartForkServer, actions)
    stage.request(session_id(1))
    assert session_ends(stage.out) == {session_id(1): "the worker fork server is not running"}
    assert of(StartForkServer, stage.advance(0.5))


# -- heartbeats ---------------------------------------------------------------------------------


def test_heartbeats_are_sent_each_interval_and_a_silent_worker_is_killed() -> None:
    stage, session, worker = busy_stage(heartbeat_timeout=5.0, pool_size=1)
    idle = next(w for w in stage.pids if w != worker)
    sent: list[str] = []
    for _ in range(10):  # the idle worker answers, the busy one is wedged
        sent += heartbeats(stage.advance(1.0))
        stage.send(idle, Heartbeat())
    assert sent.count(idle) == 10
    kills = of(KillProcess, stage.out)
    assert kills == [KillProcess(stage.pids[worker], hard=True)]
    assert stage.core.counters["workers_hung"] == 1
    stage.exit(worker, -9)
    row = stage.row(session)
    assert row["reason"] == "worker hung: no heartbeat for 5 s; killed"
    assert (
        session_ends(stage.out)[session] == "worker hung: no heartbeat for 5 s; killed; reconnect"
    )


# -- restart policy -----------------------------------------------------------------------------


def crash_loop(seed: int, crashes: int) -> tuple[Stage, list[float]]:
    """``crashes`` crashes of client c1, each new session asked at once; the delays."""
    stage = Stage(seed=seed, pool_size=1, max_restarts=3, backoff_base=1.0, backoff_cap=8.0)
    stage.boot()
    delays = []
    for n in range(crashes):
        session = session_id(n)
        stage.request(session)
        row = stage.core.sessions.get(session)
        assert row is not None
        if row.state is SessionState.BACKOFF:
            assert row.start_at is not None
            delays.append(row.start_at - stage.now)
            stage.advance(row.start_at - stage.now)
        stage.start_forked()
        stage.exit(stage.worker_of(session), -11, report_first=True)
        stage.start_forked()
    return stage, delays


def test_restart_backoff_grows_with_jitter_and_is_reproducible() -> None:
    _, delays = crash_loop(seed=1, crashes=4)
    assert len(delays) == 3  # the first session had no crash before it
    for n, delay in enumerate(delays):
        assert 0.05 <= delay <= 1.0 * 2**n  # full jitter under base * 2**(n)
    assert crash_loop(seed=1, crashes=4)[1] == delays
    assert crash_loop(seed=2, crashes=4)[1] != delays


def test_past_the_restart_intensity_a_lineage_is_fatal_until_the_window_slides() -> None:
    stage, _ = crash_loop(seed=3, crashes=4)
    actions = stage.request(session_id(100))
    reason = session_ends(actions)[session_id(100)]
    assert reason.startswith("too many worker crashes for c1 (4 in 60 s); retry in ")
    assert stage.row(session_id(100))["state"] == "fatal"
    assert stage.control("status")["devices"][0]["state"] == "backoff"
    stage.request(session_id(101), "c2")  # another client is not affected
    assert stage.row(session_id(101))["state"] == "starting"
    stage.advance(61.0)
    stage.request(session_id(102))
    assert stage.row(session_id(102))["state"] == "starting"


def test_a_client_leaving_during_backoff_ends_the_session() -> None:
    stage, _ = crash_loop(seed=4, crashes=1)
    stage.request(session_id(50))
    assert stage.row(session_id(50))["state"] == "backoff"
    stage.client_left(session_id(50))
    row = stage.row(session_id(50))
    assert (row["state"], row["reason"]) == ("exited", "client left while backing off")
    before = len(assigned(stage.out))
    stage.advance(30.0)
    assert len(assigned(stage.out)) == before


# -- limits and stop ----------------------------------------------------------------------------


def test_a_flood_of_requests_beyond_the_limit_is_refused_and_forks_are_bounded() -> None:
    stage = Stage(pool_size=1, max_sessions=3)
    stage.boot()
    for n in range(50):
        stage.request(session_id(n))
    refused = session_ends(stage.out)
    assert len(refused) == 47
    assert set(refused.values()) == {"device is at its session limit"}
    assert session_ends(stage.request(session_id(0))) == {session_id(0): DUPLICATE}
    assert stage.core.sessions.active("dev-a") == 3
    assert len(of(ForkWorker, stage.out)) == 1 + 1 + 2  # pool, its refill, two cold starts
    assert stage.core.counters["sessions_total"] == 50


def test_stop_drains_busy_workers_then_terms_then_kills() -> None:
    stage, session, worker = busy_stage(pool_size=1, drain_timeout=4.0, heartbeat_timeout=30.0)
    idle = next(w for w in stage.pids if w != worker)
    assert stage.control("stop") == {"stopping": True}
    assert of(Stopping, stage.out) == [Stopping(4.0)]
    drains = [a for a in stage.out if getattr(a, "message", None) == Drain(4.0)]
    assert [a.worker for a in drains] == [worker]  # type: ignore[attr-defined]
    assert stage.row(session)["state"] == "stopping"
    assert session_ends(stage.request(session_id(2))) == {session_id(2): "device is shutting down"}
    stage.advance(4.0 + STOP_GRACE - 0.01)
    assert of(KillProcess, stage.out) == []  # still draining
    terms = of(KillProcess, stage.advance(0.02))
    assert sorted(k.pid for k in terms) == sorted(stage.pids[w] for w in (worker, idle))
    assert not any(k.hard for k in terms)
    stage.exit(idle, -15)
    kills = of(KillProcess, stage.advance(STOP_GRACE))
    assert kills == [KillProcess(stage.pids[worker], hard=True)]
    assert of(Stopped, stage.advance(STOP_GRACE))
    assert stage.core.next_deadline() is None
    assert not [a for a in stage.out if isinstance(a, ForkWorker) and a.worker not in stage.pids]


def test_stop_ends_as_soon_as_the_workers_are_gone() -> None:
    stage, session, worker = busy_stage(pool_size=0)
    stage.control("stop", drain_timeout=0.0)
    assert any(getattr(a, "message", None) == Stop("supervisor stopping") for a in stage.out)
    stage.ended(worker, session, "stopped")
    actions = stage.exit(worker, 0)
    assert of(Stopped, actions)
    assert stage.row(session)["reason"] == "stopped"


def test_operator_kill_stops_the_worker_then_sigkills_a_straggler() -> None:
    stage, session, worker = busy_stage()
    assert stage.control("kill", session=session) == {"session": session}
    assert stage.row(session)["state"] == "stopping"
    assert session_ends(stage.out) == {session: "session killed by the operator"}
    # A second kill while it stops is an answer for the operator, not an internal error.
    assert stage.control("kill", session=session) == f"session {session} is already stopping"
    stage.advance(STOP_GRACE)
    assert KillProcess(stage.pids[worker], hard=True) in stage.out
    stage.exit(worker, -9)
    assert stage.row(session)["state"] == "exited"
    assert stage.core.counters["worker_crashes"] == 0  # a kill is no crash
    assert stage.control("kill", session=session) == f"session {session} is already exited"
    assert stage.control("kill", session="nosuchsession") == "no session nosuchsession"


def test_ended_rows_are_pruned_after_their_retention() -> None:
    stage, session, worker = busy_stage()
    stage.ended(worker, session)
    stage.exit(worker, 0)
    assert [r["id"] for r in stage.control("sessions")] == [session]
    stage.advance(121.0)
    assert stage.control("sessions") == []


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


def test_ice_servers_from_signaling_reach_the_fork_server_idle_workers_and_sessions() -> None:
    stage = Stage(pool_size=2)
    stage.boot()
    assert of(ConfigureForkServer, stage.out) == [ConfigureForkServer(IceConfig())]
    turn = IceServer("turn:198.51.100.7:3478", "1700000000:dev-a", "secret")
    actions = stage.feed(SignalReceived(DEVICE, IceServers((turn,), ttl=600)))
    assert of(ConfigureForkServer, actions) == [ConfigureForkServer(IceConfig((turn,)))]
    updates = [a for a in of(SendToWorker, actions) if isinstance(a.message, IceUpdate)]
    assert sorted(a.worker for a in updates) == sorted(stage.pids)
    assert stage.feed(SignalReceived(DEVICE, IceServers((turn,), ttl=600))) == []  # unchanged
    stage.request(session_id(1))
    (refill,) = stage.forked()
    stage.spawn(refill)
    hello = stage.hello(refill)  # forked before? it is told anyway, and ignores equal settings
    assert [a.message for a in of(SendToWorker, hello)] == [IceUpdate((turn,))]
    (assign,) = [a.message for a in of(SendToWorker, stage.out) if isinstance(a.message, Assign)]
    assert assign.ice_servers == (turn,)
