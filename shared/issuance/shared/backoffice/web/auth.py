"""Who may do what: the roles, argon2id password hashes and the users.

- ``viewer`` reads every page and changes nothing;
- ``operator`` changes channels, activities, templates and code batches;
- ``approver`` signs off budgets above the approval threshold (and reads).

An approver is not an operator: the person who raises a budget is never the
one who approves it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from issuance.shared.backoffice.web import audit
from issuance.shared.db.office_models import OfficeUser
from issuance.shared.errors import BadInput
from sqlalchemy import func, select
from sqlalchemy.orm import Session

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MIN_PASSWORD_CHARS = 12
MAX_FAILED_SIGN_INS = 5
LOCK_SECONDS = 15 * 60
# argon2-cffi's defaults: argon2id, RFC 9106's low-memory profile.
_HASHER = PasswordHasher()
# Verified when the name is unknown, so that a wrong name costs as much time
# as a wrong password and names cannot be probed by timing.
_DUMMY_HASH = _HASHER.hash("no user has this password")


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"


CHANGES = frozenset({Role.OPERATOR})
APPROVES = frozenset({Role.APPROVER})
EVERYONE = frozenset(Role)


class UserError(BadInput):
    """A user that cannot be created as asked, with the reason."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CurrentUser:
    """The signed-in user of a request (never the ORM row)."""

    user_id: int | None
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return self.name if self.user_id is not None else f"cli:{self.name}"

    @property
    def can_change(self) -> bool:
        return self.role in CHANGES

    @property
    def can_approve(self) -> bool:
        return self.role in APPROVES


def create_user(session: Session, name: str, role: str, password: str, *, by: str = "cli") -> OfficeUser:
    """Add a user with an argon2id hash of ``password`` (the first user comes
    from ``issuance office user-add``); audited in the caller's transaction."""
    if not NAME.fullmatch(name):
        raise UserError("a user name is 1 to 64 lowercase letters, digits, dots, dashes or underscores")
    try:
        checked = Role(role)
    except ValueError:
        raise UserError(f"role {role!r} is not one of {', '.join(Role)}") from None
    if len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    if session.scalar(select(func.count()).where(OfficeUser.name == name)):
        raise UserError(f"user {name!r} already exists")
    user = OfficeUser(name=name, role=checked.value, password_hash=_HASHER.hash(password))
    session.add(user)
    session.flush()
    actor = CurrentUser(user_id=None, name=by, role=Role.OPERATOR)
    audit.record(session, actor, "create", "user", name, after={"name": name, "role": checked.value})
    return user


def authenticate(session: Session, name: str, password: str) -> CurrentUser | None:
    """The user whose name and password these are, or None. After
    MAX_FAILED_SIGN_INS wrong passwords in a row a name is locked for
    LOCK_SECONDS (the caller commits the count even when this returns None).
    Upgrades the hash when the hashing parameters have changed."""
    user = session.scalar(
        select(OfficeUser).where(OfficeUser.name == name, OfficeUser.active).with_for_update()
    )
    try:
        _HASHER.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
        right = True
    except (VerificationError, InvalidHashError):
        right = False
    if user is None:
        return None
    now = datetime.now(UTC)
    if user.locked_until is not None and user.locked_until > now:
        return None
    if not right:
        user.failed_sign_ins += 1
        if user.failed_sign_ins >= MAX_FAILED_SIGN_INS:
            user.failed_sign_ins = 0
            user.locked_until = now + timedelta(seconds=LOCK_SECONDS)
        session.flush()
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    user.failed_sign_ins = 0
    user.locked_until = None
    user.last_sign_in_at = now
    session.flush()
    return CurrentUser(user_id=user.user_id, name=user.name, role=Role(user.role))


def load_user(session: Session, user_id: int) -> CurrentUser | None:
    """The user of a session, read on every request so that a deactivated
    user or a changed role takes effect at once."""
    user = session.get(OfficeUser, user_id)
    if user is None or not user.active:
        return None
    return CurrentUser(user_id=user.user_id, name=user.name, role=Role(user.role))
