"""What a worker process checks before it consumes anything.

The phone key: without a proper one, or with one that is not the key the
database's numbers were hashed with, the process prints one line and exits,
and Dramatiq's main process then stops the others. If PostgreSQL cannot be
reached at boot, the fingerprint is checked when it first is (the first
message waits for it like any outage).
"""

from __future__ import annotations

import logging
import sys

import dramatiq
import psycopg
import psycopg_pool
from issuance.shared.errors import ConfigurationError
from issuance.shared.settings import PhoneKeyError
from issuance.workers import runtime

log = logging.getLogger(__name__)
# Dramatiq's own exit status for a worker that cannot start (RET_IMPORT).
CANNOT_START = 2


class PhoneKeyCheck(dramatiq.Middleware):
    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        try:
            runtime.resources().pool  # noqa: B018 - opening the pool checks the key
        except (PhoneKeyError, ConfigurationError) as exc:
            # Straight to the process's stderr: Dramatiq's main process stops
            # reading its workers' log pipes as soon as one exits, and a line
            # logged just before the exit is often lost.
            print(f"{__name__}: cannot start: {exc}", file=sys.__stderr__, flush=True)
            raise SystemExit(CANNOT_START) from None
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("phone key not checked yet, the database is unavailable: %s", exc)
