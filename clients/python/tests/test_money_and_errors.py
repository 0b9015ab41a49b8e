"""Money conversion and the error families, as pure functions."""

from __future__ import annotations

from decimal import Decimal

import pytest

from spendcap import (
    AuthError,
    BudgetRefused,
    InvalidRequest,
    LedgerUnavailable,
    Micros,
    OutcomeUnknown,
    PaymentRefused,
    ProviderDeclined,
    ProviderError,
    error_from_response,
    format_usd,
    to_micros,
    to_usd,
    usd,
)


@pytest.mark.parametrize(
    ("amount", "micros"),
    [("1.50", 1_500_000), ("0.000001", 1), (Decimal("0.1"), 100_000), ("$2", 2_000_000), ("1e-6", 1)],
)
def test_dollars_convert_exactly(amount: str | Decimal, micros: int) -> None:
    assert to_micros(amount) == micros
    assert to_usd(micros) == Decimal(str(amount).removeprefix("$"))


@pytest.mark.parametrize("amount", [0.1, 1, True, "abc", "NaN", "0.0000005"])
def test_floats_ints_and_inexact_amounts_are_refused(amount: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        to_micros(amount)  # type: ignore[arg-type]


def test_micros_pass_through_and_format() -> None:
    assert to_micros(Micros(137)) == 137
    assert usd(3) == Micros(3_000_000)
    assert (format_usd(1_500_000), format_usd(1), format_usd(0)) == ("1.50", "0.000001", "0.00")


@pytest.mark.parametrize(
    ("status", "code", "family"),
    [
        (402, "cap_exceeded", BudgetRefused),
        (402, "budget_busy", BudgetRefused),
        (402, "x402_over_payment_maximum", PaymentRefused),
        (402, "x402_payment_rejected", ProviderDeclined),
        (422, "acp_merchant_error", ProviderDeclined),
        (504, "acp_outcome_unknown", OutcomeUnknown),
        (502, "x402_payment_outcome_unknown", OutcomeUnknown),
        (504, "ledger_outcome_unknown", OutcomeUnknown),
        (503, "ledger_unavailable", LedgerUnavailable),
        (401, "invalid_token", AuthError),
        (403, "admin_only", AuthError),
        (403, "x402_destination_forbidden", InvalidRequest),
        (422, "amount_fractional", InvalidRequest),
        (504, "acp_timeout", ProviderError),
    ],
)
def test_each_code_lands_in_its_family(status: int, code: str, family: type) -> None:
    error = error_from_response(status, {"code": code, "detail": "d", "requested_micros": 5, "remaining_micros": 2})
    assert type(error) is family
    assert (error.status, error.code, error.detail) == (status, code, "d")


def test_a_refusal_carries_its_amounts_and_a_decline_its_provider_reason() -> None:
    refused = error_from_response(
        402,
        {
            "code": "cap_exceeded",
            "detail": "",
            "requested_micros": 400_000,
            "remaining_micros": 30_000,
            "limited_by": "ag_x",
        },
    )
    assert isinstance(refused, BudgetRefused)
    assert (refused.requested, refused.remaining, refused.limited_by) == (Decimal("0.4"), Decimal("0.03"), "ag_x")
    declined = error_from_response(422, {"code": "acp_merchant_error", "provider_error": {"code": "payment_declined"}})
    assert isinstance(declined, ProviderDeclined) and declined.reason == "payment_declined"
    assert error_from_response(500, "not json").code == "http_500"
