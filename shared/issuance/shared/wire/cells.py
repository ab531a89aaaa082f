"""The routing publisher: every message of a member goes to that member's cell.

    with CellPublisher.from_settings(settings) as publisher:   # ISSUANCE_CELLS
        publisher.publish_claims(claims)     # each claim to its number's cell
        publisher.publish(OrderPlaced(...))  # to the buyer's cell

It wraps one ordinary :class:`Publisher` per cell. Claims route by their
number (issuance.shared.domain.cells.route_slot), orders and registrations by
member ID (the ID carries its cell) or number. A re-sent message routes the
same way, so it meets its first copy's idempotency key in the same database.
A batch of claims is cut into one batch per cell, each with an ID derived
from the original batch's, so a re-sent batch is cut the same way.

An order's status change names only the order, and an order naming the
buyer by app member ID names nobody the router can place: publish them with
:meth:`CellPublisher.publish_for_member`, naming the buyer, whose cell holds
the order. An opened share routes by its share ID (see ``cell_of``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from issuance.shared.cellmap import cell_settings, load_cell_map
from issuance.shared.domain import normalize_phone
from issuance.shared.domain.cells import CellMap, route_slot
from issuance.shared.errors import BadInput
from issuance.shared.settings import Settings
from issuance.shared.wire.messages import (
    ClaimRequested,
    ClaimsRequested,
    MemberRegistered,
    Message,
    OrderPlaced,
    ReferralCrossed,
    RejectedClaim,
    ShareOpened,
)
from issuance.shared.wire.publisher import Publisher, RabbitPublisher

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
CELL_BATCH_NAMESPACE = uuid.UUID("5b0f3c52-8a55-4f57-9a43-2f0b7e6c1d90")


class RoutingError(BadInput):
    """A message that names nothing to route it by."""


class CellRouter:
    """Which cell each message belongs to. Pure: no I/O."""

    def __init__(self, cells: CellMap, default_region: str) -> None:
        self.cells = cells
        self.default_region = default_region

    def phone_cell(self, phone: str) -> str:
        return self.cells.cell_for_slot(self.phone_slot(phone)).name

    def phone_slot(self, phone: str) -> int:
        """The ring slot of a number as typed (normalised first)."""
        # A number already in E.164 form (the page publishes that form) is
        # its own normal form: parsing it (about 100 us) would return it as
        # is, as it does for every region's example mobile number.
        if E164.match(phone):
            return route_slot(phone)
        try:
            e164 = normalize_phone(phone, self.default_region)
        except ValueError:
            # The worker refuses it (bad_phone); any fixed cell records the
            # refusal, and a re-send lands on the same one.
            e164 = phone
        return route_slot(e164)

    def member_cell(self, member_id: int) -> str:
        return self.cells.cell_for_member(member_id).name

    def cell_of(self, message: Message) -> str:
        if isinstance(message, ClaimRequested):
            return self.phone_cell(message.phone)
        if isinstance(message, ShareOpened):
            # The page knows only the share's ID, not its sharer: opens go to
            # the cell the ID hashes to (the same for every open), which knows
            # every cell's shares and forwards the open to the sharer's cell
            # (issuance.workers.cell_referrals).
            return self.cells.cell_for_slot(route_slot(str(message.share_id))).name
        if isinstance(message, ReferralCrossed):
            return self.member_cell(message.referrer_member_id)
        if isinstance(message, OrderPlaced) and message.member_id is not None:
            return self.member_cell(message.member_id)
        if isinstance(message, MemberRegistered):
            if message.member_id is not None:
                return self.member_cell(message.member_id)
            return self.phone_cell(message.phone or "")
        raise RoutingError(
            f"a {message.TYPE} message names no member: publish it with publish_for_member(<member ID>, ...)"
        )

    def split(self, messages: Iterable[Message]) -> dict[str, list[Message]]:
        """The messages by cell, in their order; claim batches cut per cell."""
        routed: dict[str, list[Message]] = {}
        for message in messages:
            if isinstance(message, ClaimsRequested):
                for cell, part in self.split_batch(message).items():
                    routed.setdefault(cell, []).append(part)
            else:
                routed.setdefault(self.cell_of(message), []).append(message)
        return routed

    def split_batch(self, batch: ClaimsRequested) -> dict[str, ClaimsRequested]:
        parts: dict[str, list[ClaimRequested | RejectedClaim]] = {}
        for claim in batch.claims:
            if isinstance(claim, ClaimRequested):
                cell = self.phone_cell(claim.phone)
            else:
                cell = self.cells.cells[0].name
            parts.setdefault(cell, []).append(claim)
        if len(parts) == 1:
            ((cell, _),) = parts.items()
            return {cell: batch}
        return {
            cell: ClaimsRequested(
                batch_id=uuid.uuid5(CELL_BATCH_NAMESPACE, f"{batch.batch_id}:{cell}"), claims=tuple(claims)
            )
            for cell, claims in parts.items()
        }


class CellPublisher(Publisher):
    """A publisher per cell behind one :class:`Publisher`."""

    def __init__(self, router: CellRouter, publishers: Mapping[str, Publisher]) -> None:
        missing = set(router.cells.names) - set(publishers)
        if missing:
            raise ValueError(f"no publisher for cells {sorted(missing)}")
        self.router = router
        self.publishers = dict(publishers)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        factory: Callable[[Settings], Publisher] | None = None,
        **options: Any,
    ) -> CellPublisher:
        """One RabbitPublisher per cell of the settings' cell map (or ``factory``'s)."""
        cells = load_cell_map(settings)

        def rabbit(cell_settings_: Settings) -> Publisher:
            return RabbitPublisher.from_settings(cell_settings_, **options)

        make = factory or rabbit
        publishers = {cell.name: make(cell_settings(settings, cell)) for cell in cells.cells}
        return cls(CellRouter(cells, settings.default_region), publishers)

    def publish_many(self, messages: Iterable[Message]) -> int:
        return sum(
            self.publishers[cell].publish_many(part) for cell, part in self.router.split(messages).items()
        )

    def publish_claims(self, claims: Sequence[ClaimRequested], *, batch: int = 200) -> int:
        """Claims grouped by cell first, then packed ``batch`` to a message."""
        by_cell: dict[str, list[ClaimRequested]] = {}
        for claim in claims:
            by_cell.setdefault(self.router.phone_cell(claim.phone), []).append(claim)
        return sum(self.publishers[cell].publish_claims(part, batch=batch) for cell, part in by_cell.items())

    def publish_for_member(self, member_id: int, messages: Iterable[Message]) -> int:
        """Publish messages about one member's records (an order's status, an
        opened share of the member's order) to the member's cell."""
        return self.publishers[self.router.member_cell(member_id)].publish_many(messages)

    def keepalive(self) -> None:
        for publisher in self.publishers.values():
            publisher.keepalive()

    def close(self) -> None:
        for publisher in self.publishers.values():
            publisher.close()


def publisher_for(settings: Settings, **options: Any) -> Publisher:
    """The process's publisher: routing over the cells when a cell map is
    configured, otherwise today's single RabbitPublisher, unchanged."""
    if settings.cells.strip():
        return CellPublisher.from_settings(settings, **options)
    return RabbitPublisher.from_settings(settings, **options)
