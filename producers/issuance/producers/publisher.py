"""The publisher library the order system calls.

The machinery lives in :mod:`issuance.shared.wire.publisher`, because the
workers' sweeper and the demo publish through it too; this module is the
producers' public name for it."""

from issuance.shared.wire.cells import CellPublisher, publisher_for
from issuance.shared.wire.publisher import BrokerPublisher, Publisher, RabbitPublisher

__all__ = ["BrokerPublisher", "CellPublisher", "Publisher", "RabbitPublisher", "publisher_for"]
