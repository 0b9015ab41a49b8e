"""The state of one `spend(...)` block: the hold, the cost the block reports, how it ended."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from ._models import Hold, Settlement, Voided
from ._money import Micros, Money, to_micros, to_usd


class Spend:
    """Yielded by `Agent.spend(...)`: call `charge(cost)` with what the paid call really cost."""

    def __init__(self, hold: Hold) -> None:
        self.hold = hold
        self.cost_micros: int | None = None
        self.details: dict[str, str] = {}
        self.settlement: Settlement | None = None
        self.voided: Voided | None = None

    @property
    def hold_id(self) -> str:
        return self.hold.hold_id

    def charge(self, cost: Money, details: Mapping[str, str] | None = None) -> None:
        """Records what the call cost (at most the estimate); it is settled when the block exits."""
        micros = to_micros(cost)
        if micros > self.hold.amount_micros:
            raise ValueError(f"cost {to_usd(micros)} is more than the {self.hold.amount} held")
        self.cost_micros = micros
        if details:
            self.details.update(details)

    def settle_micros(self) -> Micros:
        return Micros(self.hold.amount_micros if self.cost_micros is None else self.cost_micros)

    @property
    def spent(self) -> Decimal:
        return self.settlement.amount if self.settlement else Decimal(0)
