"""Code batches generated in the background, with their progress.

Generating a million codes takes seconds, longer than a request should
wait: the batch is made on a thread of the back office's process (in one
transaction, with its audit entry) while the browser polls its progress.
Jobs live in the memory of the process that started them, so the back
office runs as one process (``issuance office serve`` does).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading

from issuance.shared.backoffice import catalog
from issuance.shared.backoffice.web import audit
from issuance.shared.backoffice.web.auth import CurrentUser
from sqlalchemy import Engine
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
KEPT_JOBS = 200


@dataclasses.dataclass(slots=True, kw_only=True)
class Job:
    job_id: str
    activity: str
    prefix: str
    count: int
    user: str
    done: int = 0
    batch_id: int | None = None
    error: str = ""
    finished: bool = False

    @property
    def percent(self) -> int:
        return 100 if self.finished and not self.error else min(99, self.done * 100 // max(self.count, 1))

    def as_json(self) -> dict[str, object]:
        return {
            "job": self.job_id,
            "prefix": self.prefix,
            "count": self.count,
            "done": self.done,
            "percent": self.percent,
            "batch": self.batch_id,
            "error": self.error,
            "finished": self.finished,
        }


class Jobs:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, user: CurrentUser, activity: str, prefix: str, count: int) -> Job:
        job = Job(
            job_id=secrets.token_urlsafe(12), activity=activity, prefix=prefix, count=count, user=user.name
        )
        with self._lock:
            if len(self._jobs) >= KEPT_JOBS:
                for key in [k for k, j in self._jobs.items() if j.finished][: KEPT_JOBS // 2]:
                    del self._jobs[key]
            self._jobs[job.job_id] = job
        threading.Thread(target=self._run, args=(job, user), name=f"codegen-{prefix}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _run(self, job: Job, user: CurrentUser) -> None:
        def advance(inserted: int) -> None:
            job.done += inserted

        try:
            with Session(self._engine) as session, session.begin():
                batch = catalog.generate_codes(session, job.prefix, job.count, progress=advance)
                audit.record(
                    session,
                    user,
                    "generate",
                    "batch",
                    str(batch.batch_id),
                    after={"template": job.prefix, "size": job.count, "activity": job.activity},
                )
                batch_id = batch.batch_id
            job.batch_id = batch_id
        except catalog.BackOfficeError as exc:
            job.error = str(exc)
        except Exception:
            log.exception("generating %d codes for %s failed", job.count, job.prefix)
            job.error = "the batch could not be generated; nothing was kept (see the back office's log)"
        finally:
            job.finished = True
