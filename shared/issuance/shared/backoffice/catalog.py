"""The back office: channels, activities with their templates and budget,
and code batches. Low-volume writes go through the SQLAlchemy ORM; code
batches go through COPY, the fastest way into PostgreSQL."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import queue
import re
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import psycopg
import yaml
from issuance.shared import domain
from issuance.shared.db import coupon_store
from issuance.shared.db.models import Activity, Channel, Claim, Code, CodeBatch, CouponTemplate
from issuance.shared.db.office_models import CatalogVersion
from issuance.shared.domain.checkout import CouponRules, rules_problem
from issuance.shared.domain.claims import ClaimStatus
from issuance.shared.domain.coupons import LifecycleRefusal, cancel_refusal
from issuance.shared.errors import OperatorError
from sqlalchemy import ColumnElement, func, select, text
from sqlalchemy.orm import Session

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# A banner is shown from an https:// URL or a path on the page's own site;
# anything else (http:, data:, javascript:, //host) the page would not show.
BANNER_URL = re.compile(r"^(https://[^\s/?#]+|/(?![/\\]))[^\s\\]*$")


class BackOfficeError(OperatorError, ValueError):
    """An operator's request that cannot be carried out, with the reason."""


_KINDS: dict[type, str] = {int: "a whole number", str: "text", bool: "true or false", datetime: "a time"}


def _typed(spec: type, values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` if each has the type its field of ``spec`` declares;
    otherwise BackOfficeError names the field (``budget: abc``)."""
    if not isinstance(values, Mapping):
        raise BackOfficeError(f"{spec.__name__} is a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(spec)
    for name, value in values.items():
        hint = hints.get(name)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in allowed:
            continue
        kinds = [t for t in allowed if t in _KINDS]
        if kinds and not any(
            isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in kinds
        ):
            raise BackOfficeError(f"{name} must be {' or '.join(_KINDS[t] for t in kinds)}, got {value!r}")
    return values


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TemplateSpec:
    """A coupon template as in an activity file; every field is a column of
    the same name. Past kind, value and threshold, the coupon's rules
    (issuance.shared.domain.checkout.CouponRules): scope, stacking, priority,
    per-person count."""

    prefix: str
    kind: str
    value: int
    threshold_cents: int = 0
    new_user_only: bool = False
    title: str = ""
    scope_products: tuple[str, ...] = ()
    scope_categories: tuple[str, ...] = ()
    scope_stores: tuple[str, ...] = ()
    min_items: int = 0
    min_member_level: int = 0
    stackable: bool = True
    priority: int = 0
    per_person_limit: int | None = None

    def __post_init__(self) -> None:
        # A scope is a list of names, kept sorted and without repeats (so an
        # activity file read back compares equal); a bare name is refused,
        # not read as a list of its letters.
        for name in SCOPE_FIELDS:
            scope = getattr(self, name)
            if not isinstance(scope, (list, tuple)):
                raise ValueError(f"{name} must be a list of names, got {scope!r}")
            if not all(isinstance(x, str) for x in scope):
                raise ValueError(f"{name} must be a list of names (text), got {list(scope)!r}")
            object.__setattr__(self, name, tuple(sorted(set(scope))))

    def rules(self) -> CouponRules:
        """The rules as checkout evaluates them."""
        return CouponRules(
            products=frozenset(self.scope_products),
            categories=frozenset(self.scope_categories),
            stores=frozenset(self.scope_stores),
            min_items=self.min_items,
            min_member_level=self.min_member_level,
            stackable=self.stackable,
            priority=self.priority,
            per_person_limit=self.per_person_limit,
        )

    def columns(self) -> dict[str, Any]:
        """The template's row (the scopes as lists: an array column)."""
        values = dataclasses.asdict(self)
        values.update({name: list(values[name]) for name in SCOPE_FIELDS})
        return values


SCOPE_FIELDS = ("scope_products", "scope_categories", "scope_stores")


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
    # Refer K, get one back: an amount, or a coupon of the template with this
    # prefix (a template of another activity, usually one with budget 0).
    rebate_every: int = 3
    rebate_amount_cents: int | None = None
    rebate_template: str | None = None
    # The cities or provinces the activity is limited to, as their names
    # ("Jiangsu", "常州市"): a number from elsewhere is refused. None: everywhere.
    regions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.regions, (list, tuple)) or not all(isinstance(r, str) for r in self.regions):
            raise ValueError(f"regions must be a list of city or province names, got {self.regions!r}")
        object.__setattr__(self, "regions", tuple(dict.fromkeys(r.strip() for r in self.regions)))

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
            values["templates"] = tuple(_template_of(t) for t in values.get("templates", ()))
            return cls(**_typed(cls, values))
        except (TypeError, ValueError) as exc:
            raise BackOfficeError(f"invalid activity: {exc}") from None

    def check(self) -> None:
        """Refuse (BackOfficeError) the first thing wrong with this spec, in
        the order of the rules below."""
        problem = (
            _first_problem(self, _FORM_RULES)
            or next(filter(None, map(_template_problem, self.templates)), None)
            or _first_problem(self, _ZONE_AND_REBATE_RULES)
        )
        if problem is not None:
            raise BackOfficeError(problem)


def _template_of(value: Any) -> TemplateSpec:
    """A template of an activity file; a bad value names its template (the
    form shows it with the templates)."""
    if isinstance(value, TemplateSpec):
        return value
    try:
        return TemplateSpec(**_typed(TemplateSpec, value))
    except (TypeError, ValueError) as exc:
        prefix = value.get("prefix") if isinstance(value, Mapping) else None
        raise ValueError(f"template {prefix or '(no prefix)'}: {exc}") from None


_Spec = typing.TypeVar("_Spec")
# A rule: when the test holds, the spec is refused with the message (text, or
# made from the spec).
_Rule = tuple[Callable[[_Spec], bool], str | Callable[[_Spec], str]]


def _first_problem(spec: _Spec, rules: Sequence[_Rule[_Spec]]) -> str | None:
    """The message of the first rule ``spec`` breaks, or None."""
    for breaks, message in rules:
        if breaks(spec):
            return message if isinstance(message, str) else message(spec)
    return None


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ValueError, KeyError):
        return False
    return True


# The longest "N days after the claim" (the database's check agrees).
MAX_VALIDITY_DAYS = 3650
MAX_REGIONS = 100

_FORM_RULES: tuple[_Rule[ActivitySpec], ...] = (
    (
        lambda s: not SLUG.fullmatch(s.slug),
        lambda s: f"slug {s.slug!r} must be lowercase letters, digits and dashes",
    ),
    (
        lambda s: s.starts_at.tzinfo is None or s.ends_at.tzinfo is None,
        "start and end times need a UTC offset",
    ),
    (lambda s: s.ends_at <= s.starts_at, "an activity must end after it starts"),
    (lambda s: s.budget < 0, "the budget cannot be negative"),
    (
        lambda s: bool(s.banner_url) and not BANNER_URL.fullmatch(s.banner_url),
        lambda s: (
            f"banner_url {s.banner_url[:60]!r} must be an https:// URL or a path on this site starting with /"
        ),
    ),
    (lambda s: not 1 <= len(s.templates) <= 5, "a package holds 1 to 5 coupon templates"),
    (
        lambda s: len(s.regions) > MAX_REGIONS or not all(0 < len(r) <= 64 for r in s.regions),
        f"regions are at most {MAX_REGIONS} city or province names of 1 to 64 characters",
    ),
    (
        lambda s: s.validity_days is None and s.valid_until is None,
        "set validity_days or a fixed validity window (valid_until)",
    ),
    (
        lambda s: s.validity_days is not None and not 0 <= s.validity_days <= MAX_VALIDITY_DAYS,
        lambda s: f"validity_days must be 0 to {MAX_VALIDITY_DAYS} days, got {s.validity_days!r}",
    ),
    (
        lambda s: any(t is not None and t.tzinfo is None for t in (s.valid_from, s.valid_until)),
        "the validity window's times need a UTC offset",
    ),
    (
        lambda s: s.valid_from is not None and s.valid_until is not None and s.valid_until <= s.valid_from,
        "the validity window must end (valid_until) after it starts (valid_from)",
    ),
    (
        lambda s: s.valid_until is not None and s.valid_until <= s.starts_at,
        "the validity window must end (valid_until) after the activity starts",
    ),
)

TEMPLATE_KINDS = ("discount_rate", "amount_off", "gift")

_TEMPLATE_RULES: tuple[_Rule[TemplateSpec], ...] = (
    (
        lambda t: t.kind not in TEMPLATE_KINDS,
        lambda t: f"template kind {t.kind!r} is not discount_rate, amount_off or gift",
    ),
    (lambda t: t.value < 0 or t.threshold_cents < 0, "template values cannot be negative"),
    (
        lambda t: t.kind == "discount_rate" and not 0 < t.value <= 10_000,
        "a discount rate is 1 to 10000 basis points (1500 = 15% off)",
    ),
)

_ZONE_AND_REBATE_RULES: tuple[_Rule[ActivitySpec], ...] = (
    (lambda s: not _known_zone(s.timezone), lambda s: f"unknown time zone {s.timezone!r}"),
    (lambda s: s.rebate_every < 1, "rebate_every must be at least 1"),
    (
        lambda s: s.rebate_amount_cents is not None and s.rebate_template is not None,
        "a rebate is an amount or a coupon template, not both",
    ),
    (
        lambda s: s.rebate_amount_cents is not None and s.rebate_amount_cents <= 0,
        "a rebate amount must be positive",
    ),
)


def _template_problem(template: TemplateSpec) -> str | None:
    try:
        domain.validate_prefix(template.prefix)
    except ValueError as exc:
        return str(exc)
    problem = _first_problem(template, _TEMPLATE_RULES)
    if problem is None and (rules := rules_problem(template.rules())) is not None:
        problem = f"template {template.prefix}: {rules}"
    return problem


def create_channel(session: Session, name: str) -> Channel:
    if session.scalar(select(Channel).where(Channel.name == name)) is not None:
        raise BackOfficeError(f"channel {name!r} already exists")
    channel = Channel(name=name)
    session.add(channel)
    record_change(session)
    return channel


def create_activity(session: Session, spec: ActivitySpec) -> Activity:
    """Create an activity, its templates and one package slot per budget unit."""
    spec.check()
    channel_id = _channel_id(session, spec.channel)
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
    values.pop("rebate_template")
    values["exclusivity_group"] = _stored_group(spec)
    values["rebate_template_id"] = _rebate_template_id(session, spec.rebate_template, prefixes)
    values["regions"] = list(spec.regions)
    activity = Activity(channel_id=channel_id, **values)
    session.add(activity)
    session.flush()
    for position, template in enumerate(spec.templates, start=1):
        session.add(CouponTemplate(activity_id=activity.activity_id, position=position, **template.columns()))
    add_slots(session, activity.activity_id, 0, spec.budget)
    record_change(session)
    return activity


def _rebate_template_id(session: Session, prefix: str | None, own: Sequence[str]) -> int | None:
    if prefix is None:
        return None
    if prefix in own:
        raise BackOfficeError(
            f"rebate template {prefix!r} is part of this activity's package; use a template of"
            " another activity (e.g. a budget-0 rewards activity)"
        )
    template_id = session.scalar(select(CouponTemplate.template_id).where(CouponTemplate.prefix == prefix))
    if template_id is None:
        raise BackOfficeError(f"no coupon template with prefix {prefix!r} for the rebate")
    return template_id


# The fields whose values are text whatever they look like (a title "2026").
TEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(ActivitySpec) if f.type in ("str", "str | None"))


def load_activity_file(path: str) -> ActivitySpec:
    """An activity from a JSON or YAML file (``.yaml``/``.yml``), so that a
    campaign can live in version control."""
    text_ = Path(path).read_text()
    try:
        data = yaml.safe_load(text_) if path.endswith((".yaml", ".yml")) else json.loads(text_)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise BackOfficeError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise BackOfficeError(f"{path}: an activity file holds one mapping of fields")
    return ActivitySpec.from_mapping(data)


class _FileDumper(yaml.SafeDumper):
    """YAML as an operator writes an activity file: times as timestamps,
    multi-line text as a literal block, each template on one line."""


class _OneLine(dict[str, Any]):
    """A mapping written on one line (``{prefix: DXA, kind: gift, ...}``)."""


def _represent_time(dumper: yaml.SafeDumper, value: datetime) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:timestamp", value.isoformat())


def _represent_text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


def _represent_one_line(dumper: yaml.SafeDumper, value: _OneLine) -> yaml.MappingNode:
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=True)


_FileDumper.add_representer(datetime, _represent_time)
_FileDumper.add_representer(str, _represent_text)
_FileDumper.add_representer(_OneLine, _represent_one_line)

# The order of an activity file: who and when first (times next to their
# zone), the templates last.
_FILE_HEAD = ("slug", "title", "channel", "starts_at", "ends_at", "timezone")
FILE_ORDER = (
    *_FILE_HEAD,
    *(f.name for f in dataclasses.fields(ActivitySpec) if f.name not in (*_FILE_HEAD, "templates")),
    "templates",
)


# The template fields an activity file always shows; the rules only when set.
TEMPLATE_BASICS = ("prefix", "kind", "value", "threshold_cents", "new_user_only", "title")


def template_file(template: TemplateSpec) -> dict[str, Any]:
    """A template as an activity file writes it: the rules only when set."""
    unset = TemplateSpec(prefix=template.prefix, kind=template.kind, value=template.value).columns()
    return {
        name: value
        for name, value in template.columns().items()
        if name in TEMPLATE_BASICS or value != unset[name]
    }


def activity_file_text(spec: ActivitySpec) -> str:
    """``spec`` in its file form (YAML), as :func:`load_activity_file` reads
    it back: times in the activity's own zone, multi-line text such as the
    rules as a literal block, so that a shown activity can go into version
    control and be applied again unchanged."""
    zone = ZoneInfo(spec.timezone)
    values = dataclasses.asdict(spec)
    for name in ("starts_at", "ends_at", "valid_from", "valid_until"):
        if values[name] is not None:
            values[name] = values[name].astimezone(zone)
    values["templates"] = [_OneLine(template_file(t)) for t in spec.templates]
    values["regions"] = list(spec.regions)
    # Regions only when the activity is limited to some.
    ordered = {name: values[name] for name in FILE_ORDER if name != "regions" or spec.regions}
    return yaml.dump(ordered, Dumper=_FileDumper, sort_keys=False, allow_unicode=True, width=120)


def show_activity(session: Session, slug: str) -> str:
    """The activity ``slug`` in its file form (:func:`activity_file_text`)."""
    activity = session.scalar(select(Activity).where(Activity.slug == slug))
    if activity is None:
        raise BackOfficeError(f"no activity {slug!r}")
    return activity_file_text(describe_activity(session, activity))


# What may not change once an activity has granted packages, and why: anything
# members were already promised or that past claims were decided by. The rest
# (presentation, distribution, the switch, the end of the window, the budget
# within what is issued, future rebates) may.
FROZEN_AFTER_CLAIMS = {
    "starts_at": "claims were already decided by the current window",
    "timezone": "issued coupons' expiries were computed in the current time zone",
    "validity_days": "issued coupons carry expiries computed from the current validity",
    "valid_from": "issued coupons carry expiries computed from the current validity",
    "valid_until": "issued coupons carry expiries computed from the current validity",
    "exclusivity_group": "members were already admitted or refused by the current group",
    "templates": "members already hold packages made of the current templates",
    "rebate_every": "referrals were already counted towards rebates of the current size",
}


def update_activity(session: Session, slug: str, changes: Mapping[str, Any]) -> list[str]:
    """Apply ``changes`` (field -> new value, as in an activity file) to a
    live activity: what is safe changes, anything else is refused with the
    reason and nothing changes. Returns the fields that changed."""
    activity = session.scalar(select(Activity).where(Activity.slug == slug).with_for_update())
    if activity is None:
        raise BackOfficeError(f"no activity {slug!r}")
    current = describe_activity(session, activity)
    if "slug" in changes and changes["slug"] != slug:
        raise BackOfficeError("an activity's slug is its identity and cannot change")
    merged = ActivitySpec.from_mapping({**dataclasses.asdict(current), **changes})
    merged.check()
    changed = _changed_fields(current, merged)
    if changed:
        _refuse_frozen_changes(session, activity, changed)
        _write_changes(session, activity, current, merged, changed)
    record_change(session)
    return changed


def _stored_group(spec: ActivitySpec) -> str:
    """The exclusivity group as stored: an activity without one is alone in
    a group of its own."""
    return spec.exclusivity_group or _solo_group(spec.slug)


def _solo_group(slug: str) -> str:
    return f"solo:{slug}"


def _changed_fields(current: ActivitySpec, merged: ActivitySpec) -> list[str]:
    """The fields ``merged`` changes; naming the activity's own solo group
    is no change."""
    return [
        f.name
        for f in dataclasses.fields(ActivitySpec)
        if getattr(merged, f.name) != getattr(current, f.name)
        and not (f.name == "exclusivity_group" and _stored_group(merged) == _stored_group(current))
    ]


def _refuse_frozen_changes(session: Session, activity: Activity, changed: Sequence[str]) -> None:
    """Refuse changing what is frozen once the activity has granted packages."""
    frozen = [name for name in changed if name in FROZEN_AFTER_CLAIMS]
    if not frozen:
        return
    granted = session.scalar(
        select(func.count())
        .select_from(Claim)
        .where(Claim.activity_id == activity.activity_id, Claim.status != ClaimStatus.REFUSED)
    )
    if granted:
        reasons = "; ".join(f"{name}: {FROZEN_AFTER_CLAIMS[name]}" for name in frozen)
        raise BackOfficeError(f"{activity.slug} has {granted} packages issued; cannot change {reasons}")


# Fields written by a step of their own, not copied onto the activity's row.
_WRITTEN_APART = frozenset({"channel", "templates", "rebate_template", "slug"})


def _write_changes(
    session: Session, activity: Activity, current: ActivitySpec, merged: ActivitySpec, changed: Sequence[str]
) -> None:
    if "channel" in changed:
        activity.channel_id = _channel_id(session, merged.channel)
    if "templates" in changed:
        _replace_templates(session, activity.activity_id, current.templates, merged.templates)
    if "budget" in changed:
        set_budget(session, activity.activity_id, merged.budget)
    if "rebate_template" in changed:
        activity.rebate_template_id = _rebate_template_id(
            session, merged.rebate_template, [t.prefix for t in merged.templates]
        )
    for name in changed:
        if name not in _WRITTEN_APART:
            value = _stored_group(merged) if name == "exclusivity_group" else getattr(merged, name)
            setattr(activity, name, list(value) if isinstance(value, tuple) else value)
    session.flush()


def _channel_id(session: Session, name: str) -> int:
    channel_id = session.scalar(select(Channel.channel_id).where(Channel.name == name))
    if channel_id is None:
        raise BackOfficeError(f"no channel {name!r}; create it first")
    return channel_id


# -- the catalog's version ----------------------------------------------------


class CatalogMoved(BackOfficeError):
    """The catalog changed since a cross-cell change read its version."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CatalogState:
    """A database's catalog: its version, the digest of its definition as it
    is now, and the cross-cell change that made the version with the digest
    it was made from (None: a change made in this database alone, or none
    yet)."""

    version: int
    digest: str
    change: str | None
    previous_digest: str | None

    def shown(self) -> str:
        return f"version {self.version}, digest {self.digest[:12]}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Expected:
    version: int
    digest: str
    change: str


_EXPECTED: contextvars.ContextVar[_Expected | None] = contextvars.ContextVar("catalog_expected", default=None)


@contextlib.contextmanager
def expecting(state: CatalogState, change: str) -> Iterator[None]:
    """Within this block a catalog write commits only if the catalog is still
    at the version of ``state`` (compare-and-set under the version row's
    lock), and the version it makes is marked as the cross-cell change
    ``change``, made from the digest of ``state``."""
    token = _EXPECTED.set(_Expected(state.version, state.digest, change))
    try:
        yield
    finally:
        _EXPECTED.reset(token)


def _definition(spec: ActivitySpec) -> dict[str, Any]:
    """What the cells must agree on about an activity: its file form but the
    budget, which each cell holds its share of."""
    values = dataclasses.asdict(spec)
    values.pop("budget")
    for name, value in values.items():
        if isinstance(value, datetime):
            values[name] = value.astimezone(UTC).isoformat()
    return values


def catalog_digest(session: Session) -> str:
    """SHA-256 of the catalog's definition: the channels, and each activity
    with its templates as its file would write them (no budget, no code or
    package counts, no database IDs), so that two databases with the same
    catalog have the same digest."""
    definition = {
        "channels": sorted(session.scalars(select(Channel.name)).all()),
        "activities": [
            _definition(describe_activity(session, activity))
            for activity in session.scalars(select(Activity).order_by(Activity.slug)).all()
        ],
    }
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def _version_row(session: Session) -> CatalogVersion:
    # The row is made by the migration; a wiped table gets it back here.
    session.execute(text("INSERT INTO catalog_version DEFAULT VALUES ON CONFLICT DO NOTHING"))
    return session.scalars(select(CatalogVersion).with_for_update()).one()


def record_change(session: Session) -> None:
    """Called by every catalog write, in its transaction: lock the version
    row; inside :func:`expecting`, refuse (CatalogMoved, so the transaction
    rolls back) unless the version is still the expected one; and when the
    definition's digest changed, bump the version and store the digest."""
    session.flush()
    row = _version_row(session)
    expected = _EXPECTED.get()
    # A command that writes twice makes one version: its second write finds
    # the version its first one made.
    again = expected is not None and (row.version, row.change) == (expected.version + 1, expected.change)
    if expected is not None and row.version != expected.version and not again:
        raise CatalogMoved(
            f"the catalog moved to version {row.version} since it was read at version"
            f" {expected.version}; nothing changed here"
        )
    digest = catalog_digest(session)
    if digest != row.digest:
        row.version += 0 if again else 1
        row.digest = digest
        row.change = expected.change if expected is not None else None
        row.previous_digest = expected.digest if expected is not None else None
        row.changed_at = func.now()
        session.flush()


def catalog_state(session: Session) -> CatalogState:
    """The catalog's version and the digest of its definition as it is now
    (not as stored: a change made in SQL shows too)."""
    row = session.scalars(select(CatalogVersion)).one_or_none()
    return CatalogState(
        version=row.version if row else 0,
        digest=catalog_digest(session),
        change=row.change if row else None,
        previous_digest=row.previous_digest if row else None,
    )


def apply_activity(session: Session, spec: ActivitySpec) -> tuple[Activity, list[str]]:
    """Create the activity of a file, or bring an existing one to it."""
    existing = session.scalar(select(Activity).where(Activity.slug == spec.slug))
    if existing is None:
        return create_activity(session, spec), ["created"]
    changes = {f.name: getattr(spec, f.name) for f in dataclasses.fields(ActivitySpec)}
    changed = update_activity(session, spec.slug, changes)
    return session.scalars(select(Activity).where(Activity.slug == spec.slug)).one(), changed


def describe_activity(session: Session, activity: Activity) -> ActivitySpec:
    """An activity as the spec (file form) that would create it."""
    channel = session.scalar(select(Channel.name).where(Channel.channel_id == activity.channel_id))
    templates = session.scalars(
        select(CouponTemplate)
        .where(CouponTemplate.activity_id == activity.activity_id)
        .order_by(CouponTemplate.position)
    ).all()
    rebate_prefix = None
    if activity.rebate_template_id is not None:
        rebate_prefix = session.scalar(
            select(CouponTemplate.prefix).where(CouponTemplate.template_id == activity.rebate_template_id)
        )
    # Every field but these is a column of the same name.
    on_row = {
        f.name: getattr(activity, f.name)
        for f in dataclasses.fields(ActivitySpec)
        if f.name not in _NOT_COLUMNS
    }
    return ActivitySpec(
        **on_row,
        channel=channel or "",
        templates=tuple(_template_spec(t) for t in templates),
        exclusivity_group=None
        if activity.exclusivity_group == _solo_group(activity.slug)
        else activity.exclusivity_group,
        rebate_template=rebate_prefix,
    )


# The fields of an activity file that are not columns of ``activities`` as they are.
_NOT_COLUMNS = frozenset({"channel", "templates", "exclusivity_group", "rebate_template"})


def _template_spec(template: CouponTemplate) -> TemplateSpec:
    """A template as in an activity file: every field is a column of the same name."""
    return TemplateSpec(**{f.name: getattr(template, f.name) for f in dataclasses.fields(TemplateSpec)})


def _replace_templates(
    session: Session, activity_id: int, old: Sequence[TemplateSpec], new: Sequence[TemplateSpec]
) -> None:
    """Before any claim: templates may be edited, added, or removed while no
    code was generated for them."""
    old_prefixes = {t.prefix for t in old}
    new_prefixes = [t.prefix for t in new]
    added = [p for p in new_prefixes if p not in old_prefixes]
    taken = session.scalars(select(CouponTemplate.prefix).where(CouponTemplate.prefix.in_(added))).all()
    if taken or len(set(new_prefixes)) != len(new_prefixes):
        raise BackOfficeError(
            f"prefixes must be unique platform-wide; taken: {sorted(set(taken)) or new_prefixes}"
        )
    rows = {
        t.prefix: t
        for t in session.scalars(
            select(CouponTemplate).where(CouponTemplate.activity_id == activity_id)
        ).all()
    }
    for prefix in old_prefixes - set(new_prefixes):
        codes = session.scalar(
            select(func.count()).select_from(Code).where(Code.template_id == rows[prefix].template_id)
        )
        if codes:
            raise BackOfficeError(
                f"template {prefix} already has {codes} codes generated; it cannot be removed"
            )
        session.delete(rows.pop(prefix))
    session.flush()
    # Kept templates keep their places; new ones take the free places.
    free = iter(sorted(set(range(1, 6)) - {row.position for row in rows.values()}))
    for spec in new:
        kept = rows.get(spec.prefix)
        if kept is None:
            session.add(CouponTemplate(activity_id=activity_id, position=next(free), **spec.columns()))
            continue
        for name, value in spec.columns().items():
            setattr(kept, name, value)
    session.flush()


SHRINK_BUDGET = """
DELETE FROM package_slots
 WHERE (activity_id, slot_no) IN (
       SELECT activity_id, slot_no FROM package_slots
        WHERE activity_id = :activity_id AND NOT taken
        ORDER BY slot_no DESC
        LIMIT :count
          FOR UPDATE SKIP LOCKED)
"""


def set_budget(session: Session, activity_id: int, budget: int) -> None:
    """Grow the budget by adding package slots, or shrink it by deleting
    slots no claim holds; refuse to shrink below what is issued."""
    slots, top = session.execute(
        text("SELECT count(*), coalesce(max(slot_no), -1) FROM package_slots WHERE activity_id = :a"),
        {"a": activity_id},
    ).one()
    if budget > slots:
        add_slots(session, activity_id, top + 1, budget - slots)
    elif budget < slots:
        surplus = slots - budget
        result = session.execute(text(SHRINK_BUDGET), {"activity_id": activity_id, "count": surplus})
        deleted = int(getattr(result, "rowcount", 0))
        if deleted < surplus:
            issued = slots - deleted
            raise BackOfficeError(
                f"cannot shrink the budget to {budget}: {issued} packages are issued or being issued"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActivityListing:
    slug: str
    title: str
    channel: str
    prefixes: tuple[str, ...]
    validity: str
    window: str
    online: bool
    budget: int
    url: str


PAGE_SIZE = 15


def list_activities(
    session: Session, *, page: int = 1, base_url: str, filters: Sequence[ColumnElement[bool]] = ()
) -> list[ActivityListing]:
    """One page of activities, newest first, 15 per page; ``filters`` are
    conditions on Activity and Channel (the back office's list filters)."""
    if page < 1:
        raise BackOfficeError("pages are numbered from 1")
    rows = session.execute(
        select(Activity, Channel.name)
        .join(Channel, Channel.channel_id == Activity.channel_id)
        .where(*filters)
        .order_by(Activity.created_at.desc(), Activity.activity_id.desc())
        .limit(PAGE_SIZE)
        .offset((page - 1) * PAGE_SIZE)
    ).all()
    ids = [a.activity_id for a, _ in rows]
    prefixes: dict[int, list[str]] = {i: [] for i in ids}
    for activity_id, prefix in session.execute(
        select(CouponTemplate.activity_id, CouponTemplate.prefix)
        .where(CouponTemplate.activity_id.in_(ids))
        .order_by(CouponTemplate.position)
    ):
        prefixes[activity_id].append(prefix)
    listing = []
    for activity, channel in rows:
        zone = ZoneInfo(activity.timezone)
        if activity.validity_days is not None:
            validity = f"{activity.validity_days} days"
        else:
            assert activity.valid_until is not None
            validity = f"until {activity.valid_until.astimezone(zone):%Y-%m-%d %H:%M}"
        window = (
            f"{activity.starts_at.astimezone(zone):%Y-%m-%d %H:%M} - "
            f"{activity.ends_at.astimezone(zone):%Y-%m-%d %H:%M} {activity.timezone}"
        )
        listing.append(
            ActivityListing(
                slug=activity.slug,
                title=activity.title,
                channel=channel,
                prefixes=tuple(prefixes[activity.activity_id]),
                validity=validity,
                window=window,
                online=activity.online,
                budget=activity.budget,
                url=f"{base_url.rstrip('/')}/{activity.slug}",
            )
        )
    return listing


def expire_coupons(conn: psycopg.Connection[Any], now: datetime, *, chunk: int = 10_000) -> int:
    """The periodic sweep: mark unused coupons past their expiry as expired,
    ``chunk`` at a time (short transactions; rows being redeemed are skipped
    and caught by the next sweep). Idempotent."""
    total = 0
    while True:
        with conn.transaction():
            done = coupon_store.expire_due(conn, now, chunk)
        total += done
        if done < chunk:
            return total


def cancel_coupon(conn: psycopg.Connection[Any], code: str, now: datetime) -> bool:
    """An operator cancels a coupon (unused or never issued). False when it
    was already cancelled; a used or expired coupon is refused with the reason."""
    with conn.transaction():
        status = coupon_store.lock_code_status(conn, code)
        if status is None:
            raise BackOfficeError(f"{code}: {LifecycleRefusal.UNKNOWN_CODE.text}")
        if status == "cancelled":
            return False
        reason = cancel_refusal(status)
        if reason is not None:
            raise BackOfficeError(f"{code}: cannot cancel, {reason.text}")
        coupon_store.cancel_code(conn, code, now)
        return True


def add_slots(session: Session, activity_id: int, first: int, count: int) -> None:
    session.execute(
        text(
            "INSERT INTO package_slots (activity_id, slot_no)"
            " SELECT :activity_id, n FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) n"
        ),
        {"activity_id": activity_id, "first": first, "last": first + count - 1},
    )
    if count >= BULK_ROWS:
        # Fresh statistics keep the planner on the index of free slots; with
        # the table's old size it may scan every slot instead.
        session.execute(text("ANALYZE package_slots"))


# After this many rows, a bulk load refreshes the table's statistics.
BULK_ROWS = 10_000


class _Chunks:
    """Blocks of codes made on a background thread while the previous one is
    being copied: the CSPRNG, the sort and the formatting (numpy, which
    releases the GIL) overlap the server's work."""

    def __init__(self, prefix: str, count: int, chunk: int, bits: int, suffix: bytes) -> None:
        self._queue: queue.Queue[tuple[npt.NDArray[np.uint8], bytes] | None] = queue.Queue(maxsize=1)
        self._args = (prefix, count, chunk, bits, suffix)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codegen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        prefix, count, chunk, bits, suffix = self._args
        made = 0
        while made < count and not self._stop.is_set():
            block = domain.sorted_code_block(prefix, min(chunk, count - made), bits)
            self._queue.put((block, _rows(block, suffix)))
            made += len(block)
        self._queue.put(None)

    def __iter__(self) -> Iterator[tuple[npt.NDArray[np.uint8], bytes]]:
        while (item := self._queue.get()) is not None:
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        self._thread.join()


def _rows(block: npt.NDArray[np.uint8], suffix: bytes) -> bytes:
    """COPY's text rows for a block of codes, built as one byte matrix: each
    row a code and the same ``suffix`` (tab, template, tab, batch, newline).
    The codes come sorted, so they fill the primary key's leaf pages in order
    instead of at random: fewer pages touched, fewer full-page images."""
    width = block.shape[1]
    rows = np.empty((len(block), width + len(suffix)), dtype=np.uint8)
    rows[:, :width] = block
    rows[:, width:] = np.frombuffer(suffix, dtype=np.uint8)
    return rows.tobytes()


def _codes_of(block: npt.NDArray[np.uint8]) -> list[str]:
    width = block.shape[1]
    text_ = block.tobytes().decode("ascii")
    return [text_[i : i + width] for i in range(0, len(text_), width)]


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
    chunk: int = 1_000_000,
    progress: Callable[[int], None] | None = None,
) -> CodeBatch:
    """Generate a numbered batch of ``count`` codes for the template with
    ``prefix``, in the caller's transaction.

    Codes come from the OS CSPRNG (issuance.shared.domain.sorted_code_block)
    and are copied straight into ``codes`` in sorted chunks of ``chunk``
    codes, one COPY statement each under a savepoint. The primary key keeps
    them unique platform-wide: a chunk that collides (about one chance in
    10^7 per million codes at 64 bits) is rolled back to its savepoint and
    loaded again through a staging table with ``ON CONFLICT DO NOTHING``, its
    losers drawn again (issuance.shared.domain.new_codes). ``progress`` is
    told of each piece of codes sent, ``PROGRESS_CODES`` at a time, ``count``
    in all."""
    template = session.scalar(select(CouponTemplate).where(CouponTemplate.prefix == prefix))
    if template is None:
        raise BackOfficeError(f"no coupon template with prefix {prefix!r}")
    # The template's codes, from its batches' sizes (kept equal to their
    # codes, issuance.shared.db.verify): no scan of the codes themselves.
    existing = session.scalar(
        select(func.coalesce(func.sum(CodeBatch.size), 0)).where(
            CodeBatch.template_id == template.template_id
        )
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
    # The rows of each COPY are checked once at its end (migration 0011's
    # statement trigger) from their copy in a tuplestore: in memory rather
    # than spilled to a temporary file past the default work_mem.
    with contextlib.closing(chunks), _local_setting(raw, "work_mem", CHECKED_ROWS_MEMORY):
        for block, rows in chunks:
            try:
                with raw.transaction(), raw.cursor().copy(COPY_CODES) as copy:
                    _send(copy, rows, len(block), progress)
            except psycopg.errors.UniqueViolation:
                inserted = _stage(raw, _codes_of(block), template.template_id, batch.batch_id)
                missing += len(block) - inserted
    # The losers were counted with their chunk; drawn again without a word.
    while missing:
        missing -= _stage(raw, domain.new_codes(prefix, missing, bits), template.template_id, batch.batch_id)
    if count >= BULK_ROWS:
        _refresh_pool_statistics(raw)
    return batch


# A chunk is sent in pieces of this many codes, each one reported to
# ``progress``: a progress bar moves while one large COPY runs.
PROGRESS_CODES = 100_000


def _send(copy: psycopg.Copy, rows: bytes, count: int, progress: Callable[[int], None] | None) -> None:
    width = len(rows) // count
    view = memoryview(rows)
    for first in range(0, count, PROGRESS_CODES):
        piece = view[first * width : (first + PROGRESS_CODES) * width]
        copy.write(piece)
        if progress is not None:
            progress(len(piece) // width)


# Rows sampled per statistics target unit are 300: 3,000 rows at 10.
POOL_STATISTICS_TARGET = "10"
# A million checked rows take about 100 MB of tuplestore (one COPY chunk).
CHECKED_ROWS_MEMORY = "160MB"


@contextlib.contextmanager
def _local_setting(raw: psycopg.Connection[Any], name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` in the caller's transaction for a while,
    then back to what it was."""
    previous = raw.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert previous is not None
    raw.execute("SELECT set_config(%s, %s, true)", (name, value))
    # On an error the setting stays until the transaction ends (it is local).
    yield
    raw.execute("SELECT set_config(%s, %s, true)", (name, previous[0]))


def _refresh_pool_statistics(raw: psycopg.Connection[Any]) -> None:
    """Fresh statistics of the pool's columns after a bulk load, so that the
    planner sees the template's new codes and stays on the pool index. Only
    template_id and status, from a 3,000-row sample: what that choice needs,
    in about a twentieth of the time of every column from 30,000 rows (which
    read most of the table's pages)."""
    with _local_setting(raw, "default_statistics_target", POOL_STATISTICS_TARGET):
        raw.execute("ANALYZE codes (template_id, status)")


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
