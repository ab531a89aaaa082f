"""The back office: channels, activities with their templates and budget,
and code batches. Low-volume writes go through the SQLAlchemy ORM; code
batches go through COPY, the fastest way into PostgreSQL."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from shared import domain
from shared.models import Activity, Channel, Code, CodeBatch, CouponTemplate

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class BackOfficeError(ValueError):
    """An operator's request that cannot be carried out, with the reason."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TemplateSpec:
    prefix: str
    kind: str
    value: int
    threshold_cents: int = 0
    new_user_only: bool = False
    title: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivitySpec:
    slug: str
    title: str
    channel: str
    starts_at: datetime
    ends_at: datetime
    budget: int
    templates: tuple[TemplateSpec, ...]
    timezone: str = "Asia/Shanghai"
    banner_url: str = ""
    copy: str = ""
    rules: str = ""
    brand: str = ""
    online: bool = True
    exclusivity_group: str | None = None
    validity_days: int | None = 7
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    hold_until_registered: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ActivitySpec:
        """Read a spec from a decoded JSON (or YAML) document."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise BackOfficeError(f"unknown activity fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        try:
            for key in ("starts_at", "ends_at", "valid_from", "valid_until"):
                if isinstance(values.get(key), str):
                    values[key] = datetime.fromisoformat(values[key])
            values["templates"] = tuple(TemplateSpec(**t) for t in values.get("templates", ()))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise BackOfficeError(f"invalid activity: {exc}") from None

    def check(self) -> None:
        if not SLUG.fullmatch(self.slug):
            raise BackOfficeError(f"slug {self.slug!r} must be lowercase letters, digits and dashes")
        if self.starts_at.tzinfo is None or self.ends_at.tzinfo is None:
            raise BackOfficeError("start and end times need a UTC offset")
        if self.ends_at <= self.starts_at:
            raise BackOfficeError("an activity must end after it starts")
        if self.budget < 0:
            raise BackOfficeError("the budget cannot be negative")
        if not 1 <= len(self.templates) <= 5:
            raise BackOfficeError("a package holds 1 to 5 coupon templates")
        if self.validity_days is None and self.valid_until is None:
            raise BackOfficeError("set validity_days or a fixed validity window (valid_until)")
        for template in self.templates:
            try:
                domain.validate_prefix(template.prefix)
            except ValueError as exc:
                raise BackOfficeError(str(exc)) from None
            if template.kind not in ("discount_rate", "amount_off", "gift"):
                raise BackOfficeError(
                    f"template kind {template.kind!r} is not discount_rate, amount_off or gift"
                )
            if template.value < 0 or template.threshold_cents < 0:
                raise BackOfficeError("template values cannot be negative")


def create_channel(session: Session, name: str) -> Channel:
    if session.scalar(select(Channel).where(Channel.name == name)) is not None:
        raise BackOfficeError(f"channel {name!r} already exists")
    channel = Channel(name=name)
    session.add(channel)
    session.flush()
    return channel


def create_activity(session: Session, spec: ActivitySpec) -> Activity:
    """Create an activity, its templates and one package slot per budget unit."""
    spec.check()
    channel = session.scalar(select(Channel).where(Channel.name == spec.channel))
    if channel is None:
        raise BackOfficeError(f"no channel {spec.channel!r}; create it first")
    if session.scalar(select(Activity).where(Activity.slug == spec.slug)) is not None:
        raise BackOfficeError(f"activity {spec.slug!r} already exists")
    prefixes = [t.prefix for t in spec.templates]
    taken = session.scalars(select(CouponTemplate.prefix).where(CouponTemplate.prefix.in_(prefixes))).all()
    if taken or len(set(prefixes)) != len(prefixes):
        raise BackOfficeError(
            f"prefixes must be unique platform-wide; taken: {sorted(set(taken)) or prefixes}"
        )
    values = dataclasses.asdict(spec)
    values.pop("templates")
    values.pop("channel")
    values["exclusivity_group"] = spec.exclusivity_group or f"solo:{spec.slug}"
    activity = Activity(channel_id=channel.channel_id, **values)
    session.add(activity)
    session.flush()
    for position, template in enumerate(spec.templates, start=1):
        session.add(
            CouponTemplate(
                activity_id=activity.activity_id, position=position, **dataclasses.asdict(template)
            )
        )
    add_slots(session, activity.activity_id, 0, spec.budget)
    session.flush()
    return activity


def add_slots(session: Session, activity_id: int, first: int, count: int) -> None:
    session.execute(
        text(
            "INSERT INTO package_slots (activity_id, slot_no)"
            " SELECT :activity_id, n FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) n"
        ),
        {"activity_id": activity_id, "first": first, "last": first + count - 1},
    )


class _Chunks:
    """Codes made on a background thread while the previous chunk is being
    copied: the CSPRNG and the formatting overlap the server's work."""

    def __init__(self, prefix: str, count: int, chunk: int, bits: int, suffix: bytes) -> None:
        self._queue: queue.Queue[tuple[list[str], bytes] | None] = queue.Queue(maxsize=2)
        self._args = (prefix, count, chunk, bits, suffix)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codegen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prefix, count, chunk, bits, suffix = self._args
        made = 0
        while made < count and not self._stop.is_set():
            self._queue.put(_rows(domain.new_codes(prefix, min(chunk, count - made), bits), suffix))
            made += min(chunk, count - made)
        self._queue.put(None)

    def __iter__(self) -> Iterator[tuple[list[str], bytes]]:
        while (item := self._queue.get()) is not None:
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()


def _rows(codes: list[str], suffix: bytes) -> tuple[list[str], bytes]:
    # Sorted codes fill the primary key's leaf pages in order instead of at
    # random: fewer pages touched, fewer full-page images in the WAL.
    codes.sort()
    return codes, b"".join(c.encode() + suffix for c in codes)


COPY_CODES = "COPY codes (code, template_id, batch_id) FROM STDIN"
STAGE_CODES = """
INSERT INTO codes (code, template_id, batch_id)
SELECT code, %s, %s FROM code_staging
ON CONFLICT (code) DO NOTHING
"""


def generate_codes(
    session: Session,
    prefix: str,
    count: int,
    *,
    bits: int = domain.DEFAULT_CODE_RANDOM_BITS,
    chunk: int = 100_000,
    progress: Callable[[int], None] | None = None,
) -> CodeBatch:
    """Generate a numbered batch of ``count`` codes for the template with
    ``prefix``, in the caller's transaction.

    Codes come from the OS CSPRNG (shared.domain.new_codes) and are copied
    straight into ``codes`` in sorted chunks, each under a savepoint. The
    primary key keeps them unique platform-wide: a chunk that collides (about
    one chance in 10^7 per million codes at 64 bits) is rolled back to its
    savepoint and loaded again through a staging table with
    ``ON CONFLICT DO NOTHING``, its losers drawn again."""
    template = session.scalar(select(CouponTemplate).where(CouponTemplate.prefix == prefix))
    if template is None:
        raise BackOfficeError(f"no coupon template with prefix {prefix!r}")
    existing = session.scalar(
        select(func.count()).select_from(Code).where(Code.template_id == template.template_id)
    )
    try:
        domain.check_capacity(prefix, existing or 0, count, bits)
    except ValueError as exc:
        raise BackOfficeError(str(exc)) from None
    batch = CodeBatch(template_id=template.template_id, size=count)
    session.add(batch)
    session.flush()
    raw = session.connection().connection.driver_connection
    assert raw is not None
    suffix = f"\t{template.template_id}\t{batch.batch_id}\n".encode()
    chunks = _Chunks(prefix, count, chunk, bits, suffix)
    missing = 0
    try:
        for codes, rows in chunks:
            try:
                with raw.transaction(), raw.cursor().copy(COPY_CODES) as copy:
                    copy.write(rows)
                inserted = len(codes)
            except psycopg.errors.UniqueViolation:
                inserted = _stage(raw, codes, template.template_id, batch.batch_id)
                missing += len(codes) - inserted
            if progress is not None:
                progress(inserted)
    finally:
        chunks.close()
    while missing:
        inserted = _stage(raw, domain.new_codes(prefix, missing, bits), template.template_id, batch.batch_id)
        missing -= inserted
        if progress is not None:
            progress(inserted)
    return batch


def _stage(raw: psycopg.Connection[Any], codes: list[str], template_id: int, batch_id: int) -> int:
    """Insert what does not collide; return how many codes went in."""
    raw.execute("CREATE TEMP TABLE IF NOT EXISTS code_staging (code text) ON COMMIT DROP")
    raw.execute("TRUNCATE code_staging")
    with raw.cursor().copy("COPY code_staging (code) FROM STDIN") as copy:
        copy.write("\n".join(codes) + "\n")
    return raw.execute(STAGE_CODES, (template_id, batch_id)).rowcount


EXPORT_BATCH = """
COPY (
    SELECT c.code, t.prefix AS template, c.status, c.member_id AS member, c.bound_at, c.expires_at
      FROM codes c JOIN coupon_templates t USING (template_id)
     WHERE c.batch_id = {batch}
     ORDER BY c.code
) TO STDOUT WITH (FORMAT csv, HEADER)
"""


def export_batch(conn: psycopg.Connection[Any], batch_id: int) -> Iterator[bytes]:
    """Stream a batch as CSV (code, template, status, member, bound at,
    expires at): COPY TO hands the rows over in pieces, so memory stays
    constant whatever the batch size. Read-only: export as often as needed."""
    if conn.execute("SELECT 1 FROM code_batches WHERE batch_id = %s", (batch_id,)).fetchone() is None:
        raise BackOfficeError(f"no code batch {batch_id}")
    # COPY takes no bound parameters; the batch number is an int by type.
    with conn.cursor().copy(EXPORT_BATCH.format(batch=int(batch_id))) as copy:
        for data in copy:
            yield bytes(data)
