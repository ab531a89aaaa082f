"""The SQL of member identity: the app's member ID next to the phone-based
member (one app member is one member; the unique constraint of
``members.app_member_id`` guarantees it), and when a member registered in
the app, which "new user" reads.

Functions take an open psycopg connection inside the caller's transaction
and never commit. How the phone digest is computed and looked up is
:mod:`issuance.shared.db.store`'s; nothing here reads or writes it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime

from issuance.shared.db.store import Conn

MEMBER_OF_APP = "SELECT member_id FROM members WHERE app_member_id = %s"


def member_of_app(conn: Conn, app_member_id: int) -> int | None:
    """The member behind an app member ID, if one is linked."""
    row = conn.execute(MEMBER_OF_APP, (app_member_id,)).fetchone()
    return None if row is None else int(row[0])


def buyer(conn: Conn, *, member_id: int | None, app_member_id: int | None) -> int | None:
    """The member an order names, by either ID; None for an app member ID
    that no member-registered event has linked yet."""
    if member_id is not None:
        return member_id
    assert app_member_id is not None, "an order names one of the two IDs"
    return member_of_app(conn, app_member_id)


class Link(enum.StrEnum):
    LINKED = "linked"
    ALREADY = "already"
    # The app ID belongs to another member, or the member to another app ID.
    CONFLICT = "conflict"


# The member's row is locked: two registrations of one member are linked
# one after the other. Two members racing for one app ID: the unique
# constraint lets one win, the other's transaction fails and is retried,
# and then sees the conflict.
LOCK_MEMBER = "SELECT app_member_id FROM members WHERE member_id = %s FOR UPDATE"
LINK = "UPDATE members SET app_member_id = %s WHERE member_id = %s AND app_member_id IS NULL"


def link_app_member(conn: Conn, *, member_id: int, app_member_id: int) -> Link:
    """Record that ``app_member_id`` is ``member_id`` in the app."""
    row = conn.execute(LOCK_MEMBER, (member_id,)).fetchone()
    assert row is not None, "the member was just registered"
    if row[0] is not None:
        return Link.ALREADY if row[0] == app_member_id else Link.CONFLICT
    owner = member_of_app(conn, app_member_id)
    if owner is not None:
        return Link.CONFLICT
    conn.execute(LINK, (app_member_id, member_id))
    return Link.LINKED


REGISTERED = """
SELECT member_id, registered_at FROM members
 WHERE member_id = ANY(%s) AND registered_at IS NOT NULL
"""


def registered_at(conn: Conn, member_ids: Sequence[int]) -> dict[int, datetime]:
    """When each of these members registered in the app (those that did)."""
    return {int(m): at for m, at in conn.execute(REGISTERED, (list(member_ids),), prepare=False)}
