"""The one place that maps the environment to settings.

Read once with :func:`load_settings`, frozen, passed down. Every variable is
prefixed ``ISSUANCE_``; defaults work on a laptop with the services on their
standard local ports.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from functools import cache, lru_cache

PREFIX = "ISSUANCE_"


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


class PhoneKeyError(SettingsError):
    """``ISSUANCE_PHONE_KEY`` is missing, too short, a placeholder, or not the
    key the database's numbers were hashed with."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    database_url: str = "postgresql://127.0.0.1:5432/issuance"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # HMAC key for phone-number lookups; numbers are never stored in clear.
    # No default: every process that hashes numbers refuses to start without
    # a proper one (require_phone_key); only the embedded demo makes one up.
    phone_key: str = ""
    # Rotation (deploy/SECURITY.md): more phone keys, "kid:secret,...", and
    # the ID of the one new digests are made with. ISSUANCE_PHONE_KEY alone is
    # the key with ID "1"; every listed key finds the members hashed with it.
    phone_keys: str = ""
    phone_key_id: str = ""
    default_region: str = "CN"
    credit_promise_seconds: int = 86_400
    # Refer three, get one back: a referee's first paid order counts as a
    # referral only from this amount (minor units) up. One platform-wide
    # fraud floor, not a campaign term: 1-cent orders paid and refunded
    # farmed rebates (issuance.shared.domain.refunds).
    referral_min_order_cents: int = 1_000
    # Who may call the checkout API: "name:token,name:token" (the order
    # system, each partner). Empty: `issuance checkout serve` refuses to start
    # unless told --no-auth on a loopback address.
    checkout_tokens: str = ""
    # Credit a package in the transaction that binds it (one transaction per
    # batch, no credit message). False: every credit goes through the credit
    # step (credit_claim), as credits held until registration always do.
    credit_inline: bool = True
    # Retries (issuance.workers.broker.RetryPolicy): an outage is retried until it
    # ends, anything else at most max_retries times; the backoff is capped so
    # that work resumes soon after an outage, well inside the promise.
    max_retries: int = 40
    min_backoff_ms: int = 500
    max_backoff_ms: int = 60_000
    worker_threads: int = 8
    db_pool_size: int = 8
    # Group-commit flushers per worker process: transactions of claims in
    # flight at once. One leaves PostgreSQL idle while it prepares the next.
    claim_flushers: int = 2
    # Fault injection for crash tests: "", "after_commit_before_ack",
    # "after_commit_before_publish". Never set in production.
    fault: str = ""
    fault_trigger: str = ""
    metrics_port: int = 9191
    # Where activity pages are served: ``issuance activity list`` shows
    # <activity_base_url>/<slug> as each activity's URL.
    activity_base_url: str = "http://127.0.0.1:8000/a"
    # The activity page: attempts per client IP and per number in each rate
    # window, extra origins allowed to post claims (comma-separated; the
    # page's own origin always is), and how long activities are cached.
    web_rate_per_ip: int = 120
    web_rate_per_phone: int = 10
    web_rate_window_seconds: int = 60
    web_trusted_origins: str = ""
    web_cache_seconds: int = 2
    # Producers publish through this exchange when set (deploy/rabbitmq:
    # "issuance.producers", the only thing the producer user may write to);
    # empty: the default exchange, with the queues declared by the publisher
    # (claims go through "issuance.producers", declared too, for the ledger).
    producer_exchange: str = ""
    # "kid:secret,..." signs messages (issuance.shared.wire.signing); empty: signing off.
    signing_keys: str = ""
    # ``issuance verify`` reports a claim bound but not credited this long
    # after its decision, and a claim accepted (in the acceptance ledger) but
    # never recorded this long after its publish: a lost message is found in
    # minutes, not at the 24-hour deadline. The sweeper re-sends such credits
    # and claims after half of it, so verify is clean again once it ran.
    reconcile_grace_seconds: int = 600
    # RabbitMQ queue type of every queue the project declares (the work
    # queues and their .DQ delay and .XQ dead-letter queues):
    # "classic" for one node and the embedded demo, "quorum" for a cluster
    # (replicated on a majority of nodes; see issuance.shared.wire.codec). An
    # existing queue keeps its type: switching needs a new vhost (README).
    queue_type: str = "classic"
    # psycopg prepares a statement run more than a few times on a connection.
    # Behind PgBouncer in transaction mode the next transaction may land on
    # another server connection, where that statement does not exist (or
    # exists twice): set false there (prepare_threshold=None).
    db_prepared_statements: bool = True
    # The shopping app (download or open link): the activity page's "use it",
    # "view my coupons", "download the APP" and "register" buttons lead there.
    # Empty: those buttons are hidden.
    app_url: str = ""
    # The activity page against bots (deploy/SECURITY.md): attempts per
    # client network (/24, /64) and per share link in each rate window,
    # status reads and share opens per client address, the regions whose
    # numbers may claim (ISO codes, comma-separated; empty: any), and when
    # claims must pass a challenge ("off", "always", "above:N" claims a
    # minute per page process).
    web_rate_per_network: int = 600
    web_rate_per_share: int = 300
    web_status_rate_per_ip: int = 300
    web_share_opens_per_ip: int = 30
    web_allowed_regions: str = ""
    web_challenge: str = "off"
    # The address the workers' and exporter's metrics servers listen on:
    # loopback unless Prometheus scrapes from another host.
    metrics_bind: str = "127.0.0.1"
    # Logging (issuance.shared.logs): the level of the project's own loggers
    # (DEBUG, INFO, WARNING, ERROR; the libraries log at WARNING unless it
    # is DEBUG) and the format, "text" or "json" (one object per line).
    log_level: str = "INFO"
    log_format: str = "text"
    # The name of a worker group (``issuance worker --queues ...``) in its
    # process titles, its metrics directory and its metrics target file;
    # empty: its queues joined with "+", or "all".
    worker_group: str = ""
    # Where each worker group announces its metrics endpoint as a Prometheus
    # file_sd target file (<group>.json); empty: <temp dir>/issuance-metrics-targets.
    metrics_targets_dir: str = ""
    # The cell map (issuance.shared.cellmap): a JSON list of cells, inline or
    # the path of a file holding it, each {"name", "number", "database_url",
    # "amqp_url", "redis_url" (optional), "slots" (optional, "0-511")}.
    # Empty: one cell, this deployment (database_url, amqp_url, redis_url).
    cells: str = ""
    # The name of this deployment's cell in the cell map (its workers): a
    # claim whose number routes to another cell is dead-lettered as
    # wrong_cell instead of decided here. Empty: no check.
    cell: str = ""

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in SQLAlchemy's form, on the psycopg 3 driver."""
        scheme, _, rest = self.database_url.partition("://")
        if scheme in ("postgresql", "postgres"):
            return f"postgresql+psycopg://{rest}"
        return self.database_url


_INT_FIELDS = {f.name for f in dataclasses.fields(Settings) if f.type in ("int", int)}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(Settings) if f.type in ("bool", bool)}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
FAULTS = ("", "after_commit_before_ack", "after_commit_before_publish")
QUEUE_TYPES = ("classic", "quorum")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def settings_from(environ: Mapping[str, str]) -> Settings:
    """Build settings from a mapping of environment variables."""
    values: dict[str, object] = {}
    for field in dataclasses.fields(Settings):
        raw = environ.get(PREFIX + field.name.upper())
        if raw is None or raw == "":
            continue
        if field.name in _INT_FIELDS:
            try:
                values[field.name] = int(raw)
            except ValueError:
                raise SettingsError(f"{PREFIX}{field.name.upper()} must be an integer, got {raw!r}") from None
        elif field.name in _BOOL_FIELDS:
            if raw.lower() not in _BOOLS:
                raise SettingsError(f"{PREFIX}{field.name.upper()} must be true or false, got {raw!r}")
            values[field.name] = _BOOLS[raw.lower()]
        else:
            values[field.name] = raw
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.fault not in FAULTS:
        raise SettingsError(f"{PREFIX}FAULT must be one of {FAULTS}, got {settings.fault!r}")
    if settings.queue_type not in QUEUE_TYPES:
        raise SettingsError(f"{PREFIX}QUEUE_TYPE must be one of {QUEUE_TYPES}, got {settings.queue_type!r}")
    if settings.log_level.upper() not in LOG_LEVELS:
        raise SettingsError(f"{PREFIX}LOG_LEVEL must be one of {LOG_LEVELS}, got {settings.log_level!r}")
    if settings.log_format not in LOG_FORMATS:
        raise SettingsError(f"{PREFIX}LOG_FORMAT must be one of {LOG_FORMATS}, got {settings.log_format!r}")
    if settings.referral_min_order_cents < 0:
        raise SettingsError(
            f"{PREFIX}REFERRAL_MIN_ORDER_CENTS must be 0 or more (minor units), "
            f"got {settings.referral_min_order_cents}"
        )
    if settings.max_backoff_ms * settings.max_retries >= settings.credit_promise_seconds * 1000:
        raise SettingsError("retry backoff budget must stay inside the credit promise")
    return settings


MIN_CHECKOUT_TOKEN_BYTES = 24


def checkout_clients(settings: Settings) -> dict[str, str]:
    """``ISSUANCE_CHECKOUT_TOKENS`` as {token: client name}. A malformed
    entry is named by its position, never echoed: it may hold a secret."""
    clients: dict[str, str] = {}
    entries = [e.strip() for e in settings.checkout_tokens.split(",") if e.strip()]
    for number, entry in enumerate(entries, 1):
        name, _, token = entry.partition(":")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or not token:
            raise SettingsError(f"{PREFIX}CHECKOUT_TOKENS entry {number} is not name:token")
        if len(token.encode()) < MIN_CHECKOUT_TOKEN_BYTES:
            raise SettingsError(
                f"{PREFIX}CHECKOUT_TOKENS entry {number} ({name}): the token is shorter than "
                f"{MIN_CHECKOUT_TOKEN_BYTES} bytes"
            )
        if token in clients:
            raise SettingsError(f"{PREFIX}CHECKOUT_TOKENS entry {number} ({name}) repeats a token")
        clients[token] = name
    return clients


MIN_PHONE_KEY_BYTES = 16
# Values shipped in examples and older defaults: never a real key.
PLACEHOLDER_MARKS = ("change-me", "changeme")


# The ID of the key given as ISSUANCE_PHONE_KEY, and of every digest stored
# before keys had IDs (migration 0013).
SINGLE_PHONE_KEY_ID = "1"
PHONE_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,16}")


@dataclasses.dataclass(frozen=True, slots=True)
class PhoneKeys:
    """The phone keys of a process: ``secrets`` holds (key ID, secret) of
    each, the current key (the one new digests are made with) first."""

    current_id: str
    secrets: tuple[tuple[str, str], ...] = dataclasses.field(repr=False)

    @property
    def current(self) -> str:
        return self.secrets[0][1]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(kid for kid, _ in self.secrets)


def _check_secret(name: str, key: str) -> str:
    wanted = f"random secret of at least {MIN_PHONE_KEY_BYTES} bytes"
    if not key:
        raise PhoneKeyError(f"{name} is not set: give the page and every worker the same {wanted}")
    if any(mark in key.lower() for mark in PLACEHOLDER_MARKS):
        raise PhoneKeyError(f"{name} is a placeholder value: replace it with a {wanted}")
    if len(key.encode()) < MIN_PHONE_KEY_BYTES:
        raise PhoneKeyError(
            f"{name} is {len(key.encode())} bytes long: it must be at least {MIN_PHONE_KEY_BYTES}"
        )
    return key


def _listed_phone_keys(raw: str) -> dict[str, str]:
    name = f"{PREFIX}PHONE_KEYS"
    keys: dict[str, str] = {}
    for position, entry in enumerate(filter(None, (e.strip() for e in raw.split(","))), 1):
        kid, sep, secret = entry.partition(":")
        if not sep or not PHONE_KEY_ID.fullmatch(kid):  # never echoed: it may be a secret
            raise PhoneKeyError(
                f"{name} lists 'kid:secret' entries (kid: at most 16 letters, digits or ._-);"
                f" entry {position} is not one"
            )
        if kid in keys:
            raise PhoneKeyError(f"{name} lists key ID {kid!r} twice")
        keys[kid] = _check_secret(f"{name} entry {kid!r}", secret)
    return keys


@lru_cache(maxsize=64)
def require_phone_keys(settings: Settings) -> PhoneKeys:
    """Every phone key, or PhoneKeyError saying in one line what is wrong.

    Called at start-up by every process that hashes numbers (the page, the
    workers): a key that silently defaulted would hash numbers that anyone
    holding the source can reverse, and a changed key without an ID makes
    every number a new member."""
    keys = _listed_phone_keys(settings.phone_keys)
    if settings.phone_key or not keys:
        if SINGLE_PHONE_KEY_ID in keys:
            raise PhoneKeyError(
                f"key ID {SINGLE_PHONE_KEY_ID!r} is both {PREFIX}PHONE_KEY and an entry of {PREFIX}PHONE_KEYS"
            )
        keys[SINGLE_PHONE_KEY_ID] = _check_secret(f"{PREFIX}PHONE_KEY", settings.phone_key)
    current = settings.phone_key_id or (SINGLE_PHONE_KEY_ID if settings.phone_key else "")
    if not current and len(keys) == 1:
        (current,) = keys
    if current not in keys:
        raise PhoneKeyError(
            f"{PREFIX}PHONE_KEY_ID is {current!r}: it must name one of the phone keys ({', '.join(keys)})"
        )
    ordered = [(current, keys[current])] + [(kid, secret) for kid, secret in keys.items() if kid != current]
    return PhoneKeys(current_id=current, secrets=tuple(ordered))


def require_phone_key(settings: Settings) -> str:
    """The current phone key (checked with every other, :func:`require_phone_keys`)."""
    return require_phone_keys(settings).current


@cache
def load_settings() -> Settings:
    """The process's settings, read once from ``os.environ``."""
    return settings_from(os.environ)
