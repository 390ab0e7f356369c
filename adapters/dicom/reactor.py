"""The two loops of an accepted association, made to wait for their work instead of polling for it: the
association (DIMSE) loop below, and the network (DUL) loop further down.

pynetdicom (3.0) runs each accepted association's DIMSE service in ``Association._run_reactor``, a loop that sleeps
a fixed 1 ms and then looks for a message the network thread has decoded. Every C-STORE therefore waits about
half a millisecond before its handler runs (measured on the gateway with one storescu association: the time
between one instance's answer and the next one's handler went from about 2.9 to 2.0 ms with the loop below), and
an idle association wakes a thousand times a second (3 % of a core each). The loop below waits on pynetdicom's
DIMSE message queue and is also woken by what else it checks for: a release or abort request the network
thread hands over (its queue to the user is replaced by one that wakes this loop) and ``kill``. It does
pynetdicom's checks (release, abort, network thread alive, network timeout) in the same order and the same way,
and at least every _CHECK_SECONDS for what nothing announces (the network timeout). The network loop is
described above ``install_dul``. Nothing else of pynetdicom is replaced; no setting or hook of pynetdicom does
either.

Both read attributes that are not pynetdicom's public API; ``install`` and ``install_dul`` leave pynetdicom's own
loops in place when they are not there (another pynetdicom version), which is slower, never wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)

_CHECK_SECONDS = 0.05  # the longest wait without a check; the network timeout is checked this late at most
_NEEDED = ("_kill", "_is_paused", "_reactor_checkpoint", "_serve_request", "network_timeout_response", "kill")


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose ``put`` also calls ``wake``, for a loop that waits for it (each of the two loops below)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _replace_queue(owner: Any, name: str, queue_: _WakingQueue) -> None:
    """``owner.name`` replaced by ``queue_``, which takes over what was queued already (the acceptor's Evt5 is
    queued when its socket is set)."""
    queue_.queue.extend(getattr(owner, name).queue)
    setattr(owner, name, queue_)


def _then(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()

    return both


class _AnnouncingQueue(_WakingQueue):
    """The network thread's queue to the association (association, release and abort primitives): each ``put``
    is counted and wakes the association loop, which waits on ``condition`` (its DIMSE queue's)."""

    def __init__(self, condition: threading.Condition) -> None:
        super().__init__(self.announce)
        self._condition = condition
        self.announced = 0

    def announce(self) -> None:
        with self._condition:
            self.announced += 1
            self._condition.notify_all()


def install(assoc: Association) -> bool:
    """Make ``assoc`` (an acceptor, before its association is negotiated) run :func:`run`; False when this
    pynetdicom lacks what the loop needs."""
    messages = getattr(assoc.dimse, "msg_queue", None)
    user_queue = getattr(assoc.dul, "to_user_queue", None)
    if (
        not all(hasattr(assoc, name) for name in _NEEDED)
        or not isinstance(messages, queue.Queue)
        or not isinstance(user_queue, queue.Queue)
    ):
        return False
    announcing = _AnnouncingQueue(messages.not_empty)
    _replace_queue(assoc.dul, "to_user_queue", announcing)
    assoc.kill = _then(assoc.kill, announcing.announce)  # type: ignore[method-assign]
    assoc._run_reactor = lambda: run(assoc, announcing)  # type: ignore[method-assign]
    assoc.idle_timed_out = False  # type: ignore[attr-defined]
    return True


def run(assoc: Any, announcing: _AnnouncingQueue) -> None:
    """pynetdicom's ``Association._run_reactor`` for an acceptor, waiting for a message or an announcement."""
    messages: queue.Queue[Any] = assoc.dimse.msg_queue
    seen = announcing.announced
    assoc._is_paused = False
    while not assoc._kill:
        # pynetdicom sleeps 1 ms here; this wakes as soon as a message is queued or something is announced, and
        # leaves the message on the queue, so a handler that sends on the association itself (pausing this loop)
        # still receives its responses.
        with messages.not_empty:
            if not messages.queue and announcing.announced == seen and not assoc._kill:
                messages.not_empty.wait(_CHECK_SECONDS)
            seen = announcing.announced
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if assoc.acse.is_aborted():
            assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires, as in pynetdicom
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not assoc.dul.is_alive():
            assoc.kill()
            return
        if assoc.dul.idle_timer_expired():
            # Noted for the EVT_ABORTED handler: by the time it runs, the peer may have answered the abort and
            # restarted the idle timer.
            assoc.idle_timed_out = True
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return


# -- the network (DUL) thread ----------------------------------------------------------------------------------
#
# pynetdicom's ``DULServiceProvider.run_reactor`` sleeps ``_run_loop_delay`` whenever a pass finds nothing to do,
# then looks again: with the 1 ms default each C-STORE waits for two of those sleeps, with a shorter delay the
# thread spins. Measured on the gateway with one storescu association (0.2 ms delay): the idle network thread
# was the largest single user of the daemon's CPU, and every wake-up competes with the C-STORE handler for the
# GIL. The loop below blocks in select() on the association's socket and on a pipe that is written whenever a
# primitive or an event is queued for the thread (its two queues are replaced by ones that write it), so it
# runs as soon as there is something to do and not otherwise. Timers (ARTIM) and the kill flag, which pynetdicom
# sets without queueing anything, are checked at least every _DUL_CHECK_SECONDS (an idle association's thread
# wakes 20 times a second), and every _DUL_ENDING_SECONDS once the connection is closed (state Sta1), when
# pynetdicom's stop_dul sets the kill flag and waits for the thread to end.

_DUL_CHECK_SECONDS = 0.05
_DUL_ENDING_SECONDS = 0.001
_DUL_NEEDED = (
    "_kill_thread",
    "_idle_timer",
    "artim_timer",
    "event_queue",
    "to_provider_queue",
    "state_machine",
    "_process_recv_primitive",
    "_is_transport_event",
    "_target",
)


class _Waker:
    """A pipe that wakes the DUL thread from select(); opened and closed by the thread itself, so an association
    that never starts holds no descriptors."""

    def __init__(self) -> None:
        self.read_fd = -1
        self._write_fd = -1

    def open(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def close(self) -> None:
        fds, self.read_fd, self._write_fd = (self.read_fd, self._write_fd), -1, -1
        for fd in fds:
            os.close(fd)

    def wake(self) -> None:
        fd = self._write_fd
        if fd >= 0:
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: the thread has ended
                os.write(fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.read_fd, 4096)


def install_dul(assoc: Association) -> bool:
    """Make the DUL thread of ``assoc`` (before it starts) run :func:`run_dul`; False when this pynetdicom lacks
    what the loop needs (pynetdicom's own loop stays)."""
    dul = assoc.dul
    if dul.is_alive() or not all(hasattr(dul, name) for name in _DUL_NEEDED):
        return False
    if not isinstance(dul.event_queue, queue.Queue) or not isinstance(dul.to_provider_queue, queue.Queue):
        return False
    waker = _Waker()
    for name in ("event_queue", "to_provider_queue"):
        _replace_queue(dul, name, _WakingQueue(waker.wake))
    dul.kill_dul = _then(dul.kill_dul, waker.wake)  # type: ignore[method-assign]
    dul._target = lambda: run_dul(dul, waker)  # type: ignore[attr-defined]
    return True


def _socket_of(dul: Any) -> Any:
    wrapper = dul.socket
    return getattr(wrapper, "socket", None) if wrapper is not None else None


def _wait(dul: Any, waker: _Waker) -> None:
    """Block until the socket has data, something is queued, a timer may have expired, or _DUL_CHECK_SECONDS."""
    timeout = _DUL_ENDING_SECONDS if dul.state_machine.current_state == "Sta1" else _DUL_CHECK_SECONDS
    sock = _socket_of(dul)
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return  # decrypted bytes select() cannot see
    fds: list[Any] = [waker.read_fd]
    if sock is not None and sock.fileno() >= 0:
        fds.append(sock)
    try:
        ready, _, _ = select.select(fds, [], [], timeout)
    except (OSError, ValueError):  # the socket was closed meanwhile: the next pass notices
        return
    if waker.read_fd in ready:
        waker.drain()


def run_dul(dul: Any, waker: _Waker) -> None:
    """pynetdicom's ``DULServiceProvider.run_reactor``, waiting in select() instead of sleeping. Whatever was
    queued before the pipe opened is found by the first pass, which does not wait."""
    waker.open()
    try:
        dul._idle_timer.start()
        idle = False
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
            if idle:
                _wait(dul, waker)
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif dul._is_transport_event():
                    dul._idle_timer.restart()
            except Exception:
                log.exception("The DICOM network thread failed; aborting the association")
                _abort(dul)
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            if (event, dul.state_machine.current_state) not in TRANSITION_TABLE:
                # An event the state machine has no transition for, e.g. the gateway aborting (at shutdown) a
                # connection whose association request has not arrived: pynetdicom's loop logs an error and
                # ends the thread with an uncaught exception; this one aborts and closes the connection.
                log.debug("Closing a DICOM connection after an event its state does not allow (%s)", event)
                _abort(dul)
                return
            dul.state_machine.do_action(event)
            idle = False
    finally:
        waker.close()


def _abort(dul: Any) -> None:
    """Send an A-ABORT (source: service provider) past the state machine, which is in an unknown state, and end
    both threads of the association, as pynetdicom does when its loop fails."""
    pdu = A_ABORT_RQ()
    pdu.source = 0x02
    pdu.reason_diagnostic = 0x00
    with contextlib.suppress(Exception):
        dul.socket.send(pdu.encode())
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True
    dul._kill_thread = True
    with contextlib.suppress(Exception):
        dul.socket.close()
