"""The channel a claim came through, when it is not its activity's own (a
link handed out in a chat group or by a partner): kept beside the claim in
``claim_channels``, written by its own statement after the batch's claims,
so the claim batch itself is unchanged. A claim without a row here came
through its activity's channel.

Functions take an open psycopg connection inside the caller's transaction
and never commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from issuance.shared.db.store import Conn

# Only claims recorded now (a redelivered claim keeps the channel it came
# with first).
RECORD = """
INSERT INTO claim_channels (claim_id, channel)
SELECT u.claim_id, u.channel FROM unnest(%b::uuid[], %b::text[]) AS u(claim_id, channel)
ON CONFLICT (claim_id) DO NOTHING
"""


def record(conn: Conn, channels: Sequence[tuple[uuid.UUID, str | None]]) -> int:
    """Keep the channel of each claim that names one; returns how many."""
    named = [(claim_id, channel) for claim_id, channel in channels if channel is not None]
    if not named:
        return 0
    ids, names = zip(*named, strict=True)
    return conn.execute(RECORD, (list(ids), list(names))).rowcount


CHANNEL_OF = """
SELECT coalesce(k.channel, ch.name)
  FROM claims c
  LEFT JOIN claim_channels k ON k.claim_id = c.claim_id
  LEFT JOIN activities a ON a.activity_id = c.activity_id
  LEFT JOIN channels ch ON ch.channel_id = a.channel_id
 WHERE c.claim_id = %s
"""


def channel_of(conn: Conn, claim_id: uuid.UUID) -> str | None:
    """The channel a claim came through: its own, else its activity's."""
    row = conn.execute(CHANNEL_OF, (claim_id,)).fetchone()
    return None if row is None else row[0]
