"""Errors as types: one exception per failure family, carrying the fields the daemon returned.

Every error the daemon sends is `{"code", "detail", ...}` with a stable snake_case `code`; the
family is decided from the code and the HTTP status in one place, `error_from_response`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from ._money import to_usd

# The 402 codes of a budget refusal (README "HTTP API"): never worth retrying unchanged.
BUDGET_CODES = frozenset(
    {
        "cap_exceeded",
        "agent_revoked",
        "agent_expired",
        "agent_suspended",
        "protocol_denied",
        "service_denied",
        "per_payment_limit_exceeded",
        "daily_limit_exceeded",
        "weekly_limit_exceeded",
        "monthly_limit_exceeded",
        "all_time_limit_exceeded",
        "task_cap_exceeded",
        "budget_exceeded",
        "budget_busy",
    }
)

# Codes with which a provider (x402 server, ACP merchant or PSP, AP2 merchant, Credential
# Provider or processor) said no to a payment it was offered.
DECLINE_CODES = frozenset(
    {
        "x402_payment_rejected",
        "mpp_payment_rejected",
        "mpp_psp_refused",
        "acp_merchant_error",
        "acp_merchant_declined",
        "acp_psp_error",
        "ap2_payment_declined",
    }
)


class SpendcapError(Exception):
    """Any error answer of the daemon: HTTP `status`, stable `code`, human `detail`, whole `body`."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.status = status
        self.code = code
        self.detail = detail
        self.body: dict[str, Any] = body or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, detail={self.detail!r})"


class AuthError(SpendcapError):
    """The token is missing, unknown, rotated, or not allowed here (401 / 403)."""


class InvalidRequest(SpendcapError):
    """The daemon refused the request as sent (4xx): bad input, unknown thing, conflict. Nothing changed."""


class PaymentRefused(SpendcapError):
    """A 402 from spendcap itself: nothing was paid, and the same request will be refused again."""


class BudgetRefused(PaymentRefused):
    """The agent's budget (its cap, an ancestor's, a period, task or mandate budget, a list, its
    state) refused the payment before anything was signed or sent. Never worth retrying unchanged."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, detail, body)
        self.requested_micros = _int(self.body.get("requested_micros"))
        self.remaining_micros = _int(self.body.get("remaining_micros"))
        self.limited_by: str | None = self.body.get("limited_by")

    @property
    def requested(self) -> Decimal:
        return to_usd(self.requested_micros)

    @property
    def remaining(self) -> Decimal:
        return to_usd(self.remaining_micros)


class ProviderDeclined(SpendcapError):
    """The provider refused the payment (a merchant decline, a rejected x402 payment, a PSP
    refusal). `provider_error` / `reason` carry what the provider said."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, detail, body)
        provider_error = self.body.get("provider_error")
        self.provider_error: dict[str, Any] | None = provider_error if isinstance(provider_error, dict) else None
        # x402: the server's `reason`; ACP: the provider's error object; AP2: the decliner's `error`.
        reason = self.body.get("reason")
        if reason is None and self.provider_error is not None:
            reason = self.provider_error.get("code") or self.provider_error.get("message")
        if reason is None:
            reason = self.body.get("error")
        self.reason: str | None = reason if isinstance(reason, str) else None


class OutcomeUnknown(SpendcapError):
    """The payment may or may not have happened; its money stays held. Retry with the same
    idempotency key (the client already did, a bounded number of times) to learn the outcome."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, detail, body)
        hold_id = self.body.get("hold_id")
        self.hold_id: str | None = hold_id if isinstance(hold_id, str) else None


class ApprovalRequired(SpendcapError):
    """202: the payment waits for a person's approval. Its amount is held (nobody else can spend
    it meanwhile) and nothing was sent. Wait with `agent.wait_for_approval(e.approval_id)`, then
    repeat the same call with `idempotency_key=e.idempotency_key`: once approved it pays from the
    held amount, exactly once."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(status, code, detail, body)
        self.approval_id: str = str(self.body.get("approval_id") or "")
        self.reason: str = str(self.body.get("reason") or "")
        self.amount_micros = _int(self.body.get("amount_micros"))
        self.expires_at_ms = _int(self.body.get("expires_at_ms"))
        key = self.body.get("idempotency_key")
        self.idempotency_key: str | None = key if isinstance(key, str) else None

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)


class ApprovalRefused(PaymentRefused):
    """A person denied the payment (`approval_denied`), or nobody approved it in time
    (`approval_expired`): its held amount was released and nothing was paid."""


class LedgerUnavailable(SpendcapError):
    """The ledger (Redis) did not answer: every payment is refused (fail closed); nothing was paid."""


class ProviderError(SpendcapError):
    """A provider failed or could not be read (502/504 that are not unknown outcomes): the hold was
    voided or never made, so nothing was spent."""


class ServerError(SpendcapError):
    """Any other error of the daemon (5xx, not configured)."""


class TransportError(SpendcapError):
    """The daemon could not be reached, or its answer was lost. For a paying call the client
    retried with the same idempotency key before giving up."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "transport_error", detail)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def error_from_response(status: int, body: Any) -> SpendcapError:
    """The typed error of one error answer of the daemon."""
    fields: dict[str, Any] = body if isinstance(body, dict) else {}
    code = fields.get("code")
    code = code if isinstance(code, str) and code else f"http_{status}"
    detail = fields.get("detail")
    detail = detail if isinstance(detail, str) else ""
    cls: type[SpendcapError]
    if code.endswith("outcome_unknown"):
        cls = OutcomeUnknown
    elif code == "approval_required":
        cls = ApprovalRequired
    elif code in ("approval_denied", "approval_expired"):
        cls = ApprovalRefused
    elif code == "ledger_unavailable":
        cls = LedgerUnavailable
    elif status in (401, 403) and code != "x402_destination_forbidden":
        cls = AuthError
    elif code in DECLINE_CODES:
        cls = ProviderDeclined
    elif status == 402 and (code in BUDGET_CODES or "limited_by" in fields):
        cls = BudgetRefused
    elif status == 402:
        cls = PaymentRefused
    elif 400 <= status < 500:
        cls = InvalidRequest
    elif status in (502, 504):
        cls = ProviderError
    else:
        cls = ServerError
    return cls(status, code, detail, fields)
