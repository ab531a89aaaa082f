"""Referrals across cells: the events of a share that must reach its
referrer's cell (``ISSUANCE_CELLS`` with ``ISSUANCE_CELL``; without a cell
map nothing here sends anything).

A share belongs to its referrer, the buyer of the order it was opened for,
and lives in the referrer's cell; a friend's claim through it is decided in
the friend's cell, and so are the friend's orders. What crosses:

- **The share itself.** Opened in the referrer's cell (``order-placed``),
  it is announced to every other cell (``share-known``), which keeps it
  without its activity (its reports do not count it): a claim through it
  decided there knows the referrer, as a claim through a share of its own
  cell does.
- **An open of the share** (``share-opened``). The page knows only the
  share's ID and routes it by that ID (issuance.shared.wire.cells); a cell
  that finds the share is another cell's referrer's forwards the open to
  that cell with ``publish_for_member``, where it is counted in the funnel.
- **A referral, counted or reversed.** The referee's cell counts it as
  any referral (issuance.workers.lifecycle: a new member's first paid
  order through the share) and keeps it in ``referrals``. When the
  referrer is of another cell, the referral (``referral-crossed``) is sent
  there with ``publish_for_member``; that cell keeps it in
  ``cell_referrals`` and settles the referrer's rebates, counting it with
  its own referrals. A refund or cancellation of the referee's order
  reverses it there, and the same message, reversed, follows.

Each send happens after the commit of the message that leads to it and
before that message is acknowledged, on every delivery (also a duplicate's:
the first may have died between its commit and its send); a send that fails
fails the message, which is retried. Every receiver is idempotent: a share
is kept once per order, a referral once per referee, a reversal once, in
either order of arrival.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Literal

from issuance.shared.db import store
from issuance.shared.db.store import Conn
from issuance.shared.domain import share_id_for
from issuance.shared.errors import PermanentError
from issuance.shared.wire.cells import CellPublisher
from issuance.shared.wire.messages import (
    OrderPlaced,
    OrderStatusChanged,
    ReferralCrossed,
    ShareKnown,
    ShareOpened,
    utcnow,
)
from issuance.workers import lifecycle
from issuance.workers.runtime import resources, unit_of_work

log = logging.getLogger(__name__)

# Order statuses that may count a referral (paid) or reverse one.
REFERRAL_STATUSES = frozenset(("paid", "cancelled", "refunded"))


class _Sender:
    """One routing publisher over every cell's broker per process, opened on
    first use; the worker threads take turns (pika is not thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._publisher: CellPublisher | None = None

    def send(self, publish: Callable[[CellPublisher], object]) -> None:
        with self._lock:
            if self._publisher is None:
                self._publisher = CellPublisher.from_settings(resources().settings)
            try:
                publish(self._publisher)
            except Exception:
                # A broken connection is opened again by the retry.
                self._publisher.close()
                self._publisher = None
                raise


_sender = _Sender()


def _elsewhere(member_id: int) -> bool:
    """Whether the member belongs to another cell than this worker's (never
    without a cell map)."""
    res = resources()
    if res.cell is None or res.router is None:
        return False
    return res.router.member_cell(member_id) != res.cell.name


# --- the share ---------------------------------------------------------------------


def announce_share(message: OrderPlaced) -> int:
    """After an order's share is opened here: announce it to the other cells.
    Returns how many cells it was sent to."""
    res = resources()
    if res.cell is None or res.router is None:
        return 0
    share_id = share_id_for(message.order_id)
    known = unit_of_work().run(lambda conn: _share(conn, share_id))
    if known is None or _elsewhere(known.referrer_member_id):
        return 0
    here = res.cell.name
    others = [name for name in res.router.cells.names if name != here]
    _sender.send(lambda publisher: [publisher.publishers[name].publish_many([known]) for name in others])
    return len(others)


SHARE = """
SELECT share_id, order_id, referrer_member_id, placed_at FROM shares WHERE share_id = %s
"""


def _share(conn: Conn, share_id: uuid.UUID) -> ShareKnown | None:
    row = conn.execute(SHARE, (share_id,)).fetchone()
    if row is None:
        return None
    return ShareKnown(share_id=row[0], order_id=row[1], referrer_member_id=row[2], placed_at=row[3])


def keep_share(conn: Conn, message: ShareKnown) -> bool:
    """Keep another cell's share, without its activity. False when kept already."""
    if not _elsewhere(message.referrer_member_id):
        raise PermanentError(f"share {message.share_id}: its referrer is a member of this cell")
    return store.open_share(
        conn,
        share_id=message.share_id,
        order_id=message.order_id,
        activity=None,
        referrer=message.referrer_member_id,
        placed_at=message.placed_at,
    )


def forward_share_open(message: ShareOpened) -> Literal["forwarded", "ours", "unknown"]:
    """Forward an open of another cell's referrer's share to that cell
    ("forwarded"); "ours" when the share is of this cell (or there are no
    cells), "unknown" when this cell does not know the share."""
    if resources().cell is None:
        return "ours"
    known = unit_of_work().run(lambda conn: _share(conn, message.share_id))
    if known is None:
        return "unknown"
    if not _elsewhere(known.referrer_member_id):
        return "ours"
    _sender.send(lambda publisher: publisher.publish_for_member(known.referrer_member_id, [message]))
    return "forwarded"


# --- referrals --------------------------------------------------------------------------

REFERRAL_OF_ORDER = """
SELECT r.referee_member_id, r.referrer_member_id, a.slug AS activity, r.share_id, r.claim_id,
       r.order_id, r.counted_at, r.reversed_at
  FROM referrals r JOIN activities a USING (activity_id)
 WHERE r.order_id = %s
"""


def send_referral(message: OrderStatusChanged) -> bool:
    """After a referee's order was paid, refunded or cancelled here: send the
    referral it counted for (as counted or reversed) to the referrer's cell
    when that is another. Whether one was sent."""
    if message.status not in REFERRAL_STATUSES or resources().cell is None:
        return False
    crossed = unit_of_work().run(lambda conn: _referral(conn, message.order_id))
    if crossed is None or not _elsewhere(crossed.referrer_member_id):
        return False
    _sender.send(lambda publisher: publisher.publish_for_member(crossed.referrer_member_id, [crossed]))
    log.info(
        "referral of member %s %s, sent to the cell of member %s",
        crossed.referee_member_id,
        "reversed" if crossed.reversed_at else "counted",
        crossed.referrer_member_id,
    )
    return True


def _referral(conn: Conn, order_id: str) -> ReferralCrossed | None:
    row = conn.execute(REFERRAL_OF_ORDER, (order_id,)).fetchone()
    if row is None:
        return None
    names = ("referee_member_id", "referrer_member_id", "activity", "share_id", "claim_id", "order_id")
    values = dict(zip(names, row[:6], strict=True))
    return ReferralCrossed(**values, counted_at=row[6], reversed_at=row[7])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CrossedOutcome:
    recorded: bool
    settled: lifecycle.Settled


RECORD_COUNTED = """
INSERT INTO cell_referrals (referee_member_id, referrer_member_id, activity_id, share_id, claim_id,
                            order_id, counted_at, reversed_at)
VALUES (%(referee)s, %(referrer)s, %(activity_id)s, %(share_id)s, %(claim_id)s, %(order_id)s,
        %(counted_at)s, %(reversed_at)s)
ON CONFLICT (referee_member_id) DO NOTHING
"""
# A reversal may arrive before its count: then it is kept reversed at once.
RECORD_REVERSED = """
INSERT INTO cell_referrals (referee_member_id, referrer_member_id, activity_id, share_id, claim_id,
                            order_id, counted_at, reversed_at)
VALUES (%(referee)s, %(referrer)s, %(activity_id)s, %(share_id)s, %(claim_id)s, %(order_id)s,
        %(counted_at)s, %(reversed_at)s)
ON CONFLICT (referee_member_id) DO UPDATE SET reversed_at = EXCLUDED.reversed_at
 WHERE cell_referrals.reversed_at IS NULL
"""
SHARE_HERE = """
SELECT s.referrer_member_id, a.activity_id
  FROM shares s, activities a
 WHERE s.share_id = %s AND a.slug = %s
"""


def record_crossed(conn: Conn, message: ReferralCrossed, *, now: datetime | None = None) -> CrossedOutcome:
    """Keep a referral counted in the referee's cell for a referrer of this
    one (or its reversal), then settle the referrer's rebates in the
    activity. A message that does not fit this cell's share is refused."""
    now = now or utcnow()
    if _elsewhere(message.referrer_member_id):
        raise PermanentError(
            f"referral of member {message.referee_member_id}: the referrer is of another cell"
        )
    row = conn.execute(SHARE_HERE, (message.share_id, message.activity)).fetchone()
    if row is None or row[0] != message.referrer_member_id:
        raise PermanentError(
            f"referral of member {message.referee_member_id}: share {message.share_id} of member "
            f"{message.referrer_member_id} in activity {message.activity} is not in this cell"
        )
    params = {
        "referee": message.referee_member_id,
        "referrer": message.referrer_member_id,
        "activity_id": row[1],
        "share_id": message.share_id,
        "claim_id": message.claim_id,
        "order_id": message.order_id,
        "counted_at": message.counted_at,
        "reversed_at": message.reversed_at,
    }
    sql = RECORD_COUNTED if message.reversed_at is None else RECORD_REVERSED
    recorded = conn.execute(sql, params).rowcount == 1
    settled = lifecycle.settle_rebates(conn, message.referrer_member_id, row[1], now)
    return CrossedOutcome(recorded=recorded, settled=settled)
