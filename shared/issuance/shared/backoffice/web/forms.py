"""The activity form: HTML form fields to and from the values
``catalog.ActivitySpec`` reads. Only the shape of the input is checked here
(a number is a number, a date is a date); every rule is the catalog's, and
its message is shown next to the field it is about."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from issuance.shared.backoffice import catalog

MAX_TEMPLATES = 5
TEXT = ("slug", "title", "channel", "timezone", "banner_url", "copy", "rules", "brand")
OPTIONAL_TEXT = ("exclusivity_group", "rebate_template")
INTEGERS = ("budget", "rebate_every")
OPTIONAL_INTEGERS = ("validity_days", "rebate_amount_cents")
INSTANTS = ("starts_at", "ends_at")
OPTIONAL_INSTANTS = ("valid_from", "valid_until")
FLAGS = ("online", "hold_until_registered")
LISTS = ("regions",)
TEMPLATE_FIELDS = ("prefix", "kind", "value", "threshold_cents", "new_user_only", "title", "rules")
# A template's rules (scope, stacking, priority, per-person count) are one
# field of JSON: only the rules set, as in an activity file.
RULE_FIELDS = tuple(
    f.name for f in dataclasses.fields(catalog.TemplateSpec) if f.name not in catalog.TEMPLATE_BASICS
)
LOCAL_FORMAT = "%Y-%m-%dT%H:%M:%S"
FIELD_NAMES = (
    *TEXT,
    *OPTIONAL_TEXT,
    *INTEGERS,
    *OPTIONAL_INTEGERS,
    *INSTANTS,
    *OPTIONAL_INSTANTS,
    *FLAGS,
    *LISTS,
)

# Where a catalog message is shown when it names no field: the first
# field whose words it contains (anything else goes above the form).
MESSAGE_FIELDS = (
    ("slug", ("slug",)),
    ("ends_at", ("end after",)),
    ("starts_at", ("utc offset",)),
    ("timezone", ("time zone",)),
    ("channel", ("channel",)),
    ("budget", ("budget",)),
    ("validity_days", ("validity",)),
    ("regions", ("regions",)),
    ("rebate_amount_cents", ("rebate amount", "rebate is an amount")),
    ("rebate_template", ("rebate template",)),
    ("rebate_every", ("rebate_every",)),
    ("templates", ("template", "prefix", "package holds", "discount rate")),
    ("banner_url", ("banner",)),
)


def template_key(row: int, name: str) -> str:
    return f"t{row}_{name}"


def render(spec: catalog.ActivitySpec | None) -> dict[str, str]:
    """The form's field values (text) for ``spec``, or a new activity's."""
    values: dict[str, str] = {name: "" for name in FIELD_NAMES}
    for row in range(MAX_TEMPLATES):
        for name in TEMPLATE_FIELDS:
            values[template_key(row, name)] = ""
    if spec is None:
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(catalog.ActivitySpec)
            if f.default is not dataclasses.MISSING
        }
        values.update(
            timezone=str(defaults["timezone"]),
            online="on" if defaults["online"] else "",
            validity_days=str(defaults["validity_days"] or ""),
            rebate_every=str(defaults["rebate_every"]),
            t0_kind="amount_off",
        )
        return values
    zone = _zone(spec.timezone)
    for name in (*TEXT, *OPTIONAL_TEXT, *INTEGERS, *OPTIONAL_INTEGERS):
        value = getattr(spec, name)
        values[name] = "" if value is None else str(value)
    for name in (*INSTANTS, *OPTIONAL_INSTANTS):
        value = getattr(spec, name)
        values[name] = "" if value is None else _local(value, zone)
    for name in FLAGS:
        values[name] = "on" if getattr(spec, name) else ""
    for name in LISTS:
        values[name] = ", ".join(getattr(spec, name))
    for row, template in enumerate(spec.templates):
        values.update(
            {
                template_key(row, "prefix"): template.prefix,
                template_key(row, "kind"): template.kind,
                template_key(row, "value"): str(template.value),
                template_key(row, "threshold_cents"): str(template.threshold_cents),
                template_key(row, "new_user_only"): "on" if template.new_user_only else "",
                template_key(row, "title"): template.title,
                template_key(row, "rules"): _rules_text(template),
            }
        )
    return values


@dataclasses.dataclass(slots=True)
class Parsed:
    """What a submitted form says: the raw text (to show again), the values
    in ActivitySpec's terms, and the errors by field."""

    raw: dict[str, str]
    values: dict[str, Any]
    errors: dict[str, str]


def parse(form: Mapping[str, str]) -> Parsed:
    raw = {name: str(form.get(name, "")).strip() for name in FIELD_NAMES}
    raw.update(
        {
            key: str(form.get(key, "")).strip()
            for key in (template_key(row, name) for row in range(MAX_TEMPLATES) for name in TEMPLATE_FIELDS)
        }
    )
    values: dict[str, Any] = {name: raw[name] for name in TEXT}
    values.update({name: raw[name] or None for name in OPTIONAL_TEXT})
    errors: dict[str, str] = {}
    _read_each(
        raw,
        (*INTEGERS, *OPTIONAL_INTEGERS),
        optional=OPTIONAL_INTEGERS,
        read=int,
        error=WHOLE_NUMBER,
        values=values,
        errors=errors,
    )
    zone = _zone(raw["timezone"])
    _read_each(
        raw,
        (*INSTANTS, *OPTIONAL_INSTANTS),
        optional=OPTIONAL_INSTANTS,
        read=lambda text: datetime.fromisoformat(text).replace(tzinfo=zone),
        error="enter a date and time (YYYY-MM-DD HH:MM)",
        values=values,
        errors=errors,
    )
    values.update({name: bool(raw[name]) for name in FLAGS})
    values.update({name: [x.strip() for x in raw[name].split(",") if x.strip()] for name in LISTS})
    values["templates"] = [
        _parse_template(raw, row, errors) for row in range(MAX_TEMPLATES) if raw[template_key(row, "prefix")]
    ]
    return Parsed(raw=raw, values=values, errors=errors)


WHOLE_NUMBER = "enter a whole number"


def _read_each(
    raw: Mapping[str, str],
    names: Sequence[str],
    *,
    optional: Sequence[str],
    read: Callable[[str], Any],
    error: str,
    values: dict[str, Any],
    errors: dict[str, str],
) -> None:
    """Read each field of ``names`` into ``values``; an empty optional field
    is None, text ``read`` refuses is ``error`` for that field."""
    for name in names:
        if not raw[name] and name in optional:
            values[name] = None
            continue
        try:
            values[name] = read(raw[name])
        except ValueError:
            errors[name] = error


def _parse_template(raw: Mapping[str, str], row: int, errors: dict[str, str]) -> dict[str, Any]:
    """The template of form row ``row``; empty numbers are 0."""
    numbers: dict[str, Any] = {}
    keys = [template_key(row, "value"), template_key(row, "threshold_cents")]
    _read_each(
        raw,
        keys,
        optional=(),
        read=lambda text: int(text or "0"),
        error=WHOLE_NUMBER,
        values=numbers,
        errors=errors,
    )
    return {
        "prefix": raw[template_key(row, "prefix")].upper(),
        "kind": raw[template_key(row, "kind")],
        "value": numbers.get(keys[0], 0),
        "threshold_cents": numbers.get(keys[1], 0),
        "new_user_only": bool(raw[template_key(row, "new_user_only")]),
        "title": raw[template_key(row, "title")],
        **_read_rules(raw, row, errors),
    }


RULES_FORM = 'enter the rules as a JSON object, e.g. {"scope_stores": ["S1"], "stackable": false}'


def _rules_text(template: catalog.TemplateSpec) -> str:
    rules = {k: v for k, v in catalog.template_file(template).items() if k in RULE_FIELDS}
    return json.dumps(rules, ensure_ascii=False) if rules else ""


def _read_rules(raw: Mapping[str, str], row: int, errors: dict[str, str]) -> dict[str, Any]:
    """The rules field of form row ``row``: a JSON object of rule fields
    (their values are the catalog's to check)."""
    key = template_key(row, "rules")
    if not raw[key]:
        return {}
    try:
        rules = json.loads(raw[key])
    except json.JSONDecodeError:
        rules = None
    if not isinstance(rules, dict):
        errors[key] = RULES_FORM
        return {}
    unknown = sorted(set(rules) - set(RULE_FIELDS))
    if unknown:
        errors[key] = f"unknown rules {', '.join(unknown)}; the rules are {', '.join(RULE_FIELDS)}"
        return {}
    return rules


def changes(parsed: Parsed, current: Mapping[str, str]) -> dict[str, Any]:
    """The values of the fields whose text differs from the current
    activity's form (an untouched date keeps its seconds and zone)."""
    out = {name: parsed.values[name] for name in FIELD_NAMES if parsed.raw[name] != current[name]}
    out.pop("slug", None)
    template_keys = [template_key(r, n) for r in range(MAX_TEMPLATES) for n in TEMPLATE_FIELDS]
    if any(parsed.raw[k] != current[k] for k in template_keys):
        out["templates"] = parsed.values["templates"]
    return out


def field_of(message: str) -> str:
    """The form field a catalog message is about ("" when none is)."""
    lowered = message.lower()
    named = [
        name
        for name in (*FIELD_NAMES, "templates")
        if re.search(rf"(?<![a-z_]){re.escape(name)}(?![a-z_])", lowered) and "_" in name
    ]
    if named:
        return named[0]
    for field, words in MESSAGE_FIELDS:
        if any(word in lowered for word in words):
            return field
    return ""


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError):
        # The catalog reports the unknown zone; the times are read as UTC meanwhile.
        return ZoneInfo("UTC")


def _local(value: datetime, zone: ZoneInfo) -> str:
    return value.astimezone(zone).strftime(LOCAL_FORMAT)
