"""Crash points for the fault-injection tests.

A crash point fires only when ``ISSUANCE_FAULT`` names it *and* the trigger
file ``ISSUANCE_FAULT_TRIGGER`` exists; firing removes the file first, so one
trigger is one crash, and a restarted worker does not crash again.
"""

from __future__ import annotations

import os
import signal

from issuance.shared.settings import Settings


def crash_point(settings: Settings, name: str) -> None:
    if settings.fault != name or not settings.fault_trigger:
        return
    try:
        os.remove(settings.fault_trigger)
    except FileNotFoundError:
        return
    # Like an OOM kill or a power cut: no cleanup, no ack, no goodbye.
    os.kill(os.getpid(), signal.SIGKILL)
