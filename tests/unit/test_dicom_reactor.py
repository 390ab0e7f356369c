"""The association loop that waits for messages instead of polling is installed on this pynetdicom (the
association tests run every exchange, release, abort and timeout through it); on a pynetdicom without what it
needs, pynetdicom's own loop stays."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.association import Association

from adapters.dicom import reactor


def test_it_is_installed_on_an_acceptor_of_this_pynetdicom() -> None:
    assoc = Association(AE(), "acceptor")
    assert reactor.install(assoc)
    assert vars(assoc)["_run_reactor"].__module__ == reactor.__name__


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
