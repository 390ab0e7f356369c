"""The association loop that waits for messages instead of polling is installed on this pynetdicom (the
association tests run every exchange, release, abort and timeout through it); on a pynetdicom without what it
needs, pynetdicom's own loop stays."""

from __future__ import annotations

import threading

from pynetdicom import AE
from pynetdicom.association import Association

from adapters.dicom import reactor


def test_it_is_installed_on_an_acceptor_of_this_pynetdicom() -> None:
    assoc = Association(AE(), "acceptor")
    assoc.dul.to_user_queue.put("queued before")  # must not be lost
    assert reactor.install(assoc)
    assert vars(assoc)["_run_reactor"].__module__ == reactor.__name__
    announcing = assoc.dul.to_user_queue
    assert isinstance(announcing, reactor._AnnouncingQueue)
    assert announcing.get_nowait() == "queued before"


def test_what_the_loop_waits_for_is_announced() -> None:
    # The association loop sleeps until a message, an announcement or _CHECK_SECONDS: a release or abort request
    # from the network thread, and kill(), must wake it.
    assoc = Association(AE(), "acceptor")
    assert reactor.install(assoc)
    announcing = assoc.dul.to_user_queue
    assert isinstance(announcing, reactor._AnnouncingQueue)
    woken: list[int] = []
    messages = assoc.dimse.msg_queue

    def waiter() -> None:
        with messages.not_empty:
            woken.append(int(messages.not_empty.wait(10)))

    for wake in (lambda: announcing.put("A-RELEASE"), assoc.kill):
        t = threading.Thread(target=waiter)
        with messages.not_empty:  # the waiter cannot miss the wake-up: it waits before this lock is released
            t.start()
            while not messages.not_empty._waiters:  # type: ignore[attr-defined]
                messages.not_empty.wait(0.001)
        wake()
        t.join(5)
    assert woken == [1, 1]
    assert announcing.announced == 2


def test_pynetdicom_s_own_loop_stays_when_what_it_needs_is_missing() -> None:
    assoc = Association(AE(), "acceptor")
    del assoc.dimse.msg_queue
    assert not reactor.install(assoc)
    assert "_run_reactor" not in vars(assoc)


def test_the_waiting_network_loop_is_installed_on_this_pynetdicom() -> None:
    assoc = Association(AE(), "acceptor")
    assoc.dul.event_queue.put("Evt5")  # queued before the loop is installed: it must not be lost
    assert reactor.install_dul(assoc)
    assert isinstance(assoc.dul.event_queue, reactor._WakingQueue)
    assert isinstance(assoc.dul.to_provider_queue, reactor._WakingQueue)
    assert assoc.dul.event_queue.get_nowait() == "Evt5"


def test_pynetdicom_s_own_network_loop_stays_when_what_it_needs_is_missing() -> None:
    assoc = Association(AE(), "acceptor")
    del assoc.dul.artim_timer
    assert not reactor.install_dul(assoc)
    assert not isinstance(assoc.dul.event_queue, reactor._WakingQueue)
