"""Money as the daemon counts it: integer micro-USD (1 USD = 1,000,000), never floats.

Amounts go in as `Decimal`, exact decimal text (`"1.50"`), or exact micros (`Micros`, or
`usd(...)`); they come back as `int` micros with a `Decimal` USD view. A plain `int` is refused
where an amount is expected: it could be dollars or micros, and a million-fold mistake is one
nobody should be able to make by accident (`usd(5)` says "five dollars" explicitly).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
_MICRO = Decimal("0.000001")


class Micros(int):
    """An amount that is already in micro-USD (an `int` subclass, so it is sent as it is)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Micros({int(self)})"

    @property
    def usd(self) -> Decimal:
        return to_usd(int(self))


Money = Decimal | str | Micros
"""USD as `Decimal` or exact text (`"1.50"`), or `Micros`."""


def usd(amount: Decimal | str | int) -> Micros:
    """Exact micros of a dollar amount: `usd("1.50") == Micros(1_500_000)`.

    Floats are refused (`0.1` has no exact binary value); so are amounts finer than a micro-dollar.
    """
    if isinstance(amount, (bool, float)):
        raise TypeError(f"amounts are Decimal or exact text, never {type(amount).__name__}: {amount!r}")
    if isinstance(amount, Micros):
        return amount
    if isinstance(amount, int):
        return Micros(amount * MICROS_PER_USD)
    if isinstance(amount, str):
        try:
            value = Decimal(amount.strip().removeprefix("$"))
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {amount!r}") from None
    elif isinstance(amount, Decimal):
        value = amount
    else:
        raise TypeError(f"amounts are Decimal or exact text, never {type(amount).__name__}: {amount!r}")
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {amount!r}")
    micros = value * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"{amount!r} is finer than one micro-dollar (0.000001)")
    return Micros(int(micros))


def to_micros(amount: Money) -> int:
    """The micros of an amount: `Decimal` or text dollars, or `Micros` (passed through)."""
    if isinstance(amount, int) and not isinstance(amount, Micros):
        raise TypeError(
            f"ambiguous amount {amount!r}: pass dollars as Decimal or text ('1.50'), or micros as Micros({amount})"
        )
    return int(usd(amount))


def to_usd(micros: int) -> Decimal:
    """`Decimal` dollars of an amount in micros, exactly: `to_usd(1_500_000) == Decimal("1.500000")`."""
    return (Decimal(micros) / MICROS_PER_USD).quantize(_MICRO)


def format_usd(micros: int) -> str:
    """`"1.50"`-style text with at least two decimals, exact."""
    text = f"{to_usd(micros):f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    return f"{whole}.{fraction.ljust(2, '0')}"
