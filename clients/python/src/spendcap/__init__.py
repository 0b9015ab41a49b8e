"""spendcap: a Python client for the spendcap daemon — an isolated payment identity with a hard
spending cap for each AI agent, across x402, Stripe ACP and Google AP2.

    from spendcap import Spendcap

    with Spendcap().run(cap="1.50") as agent:      # revoked when the block exits
        agent.fetch("https://api.example.com/search", task="research-7")

Sync (`Spendcap`, `Agent`) and async (`AsyncSpendcap`, `AsyncAgent`) clients with the same
surface over `httpx`; amounts in as `Decimal` / exact text, out as int micros plus `Decimal` USD.
"""

from ._async import AsyncAgent, AsyncSpendcap
from ._errors import (
    ApprovalRefused,
    ApprovalRequired,
    AuthError,
    BudgetRefused,
    InvalidRequest,
    LedgerUnavailable,
    OutcomeUnknown,
    PaymentRefused,
    ProviderDeclined,
    ProviderError,
    ServerError,
    SpendcapError,
    TransportError,
    error_from_response,
)
from ._models import (
    AgentInfo,
    Ap2Key,
    Ap2Payment,
    Budget,
    Canceled,
    Checkout,
    CreatedAgent,
    FetchResult,
    Hold,
    Receipt,
    ReceiptKey,
    Revoked,
    RotatedToken,
    Settlement,
    TaskOutcome,
    TaskToken,
    Voided,
    X402Payment,
)
from ._money import Micros, Money, format_usd, to_micros, to_usd, usd
from ._spend import Spend
from ._sync import Agent, Spendcap
from .receipts import ChainReport, ReceiptInvalid

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentInfo",
    "Ap2Key",
    "Ap2Payment",
    "ApprovalRefused",
    "ApprovalRequired",
    "AsyncAgent",
    "AsyncSpendcap",
    "AuthError",
    "Budget",
    "BudgetRefused",
    "Canceled",
    "ChainReport",
    "Checkout",
    "CreatedAgent",
    "FetchResult",
    "Hold",
    "InvalidRequest",
    "LedgerUnavailable",
    "Micros",
    "Money",
    "OutcomeUnknown",
    "PaymentRefused",
    "ProviderDeclined",
    "ProviderError",
    "Receipt",
    "ReceiptInvalid",
    "ReceiptKey",
    "Revoked",
    "RotatedToken",
    "ServerError",
    "Settlement",
    "Spend",
    "Spendcap",
    "SpendcapError",
    "TaskOutcome",
    "TaskToken",
    "TransportError",
    "Voided",
    "X402Payment",
    "__version__",
    "error_from_response",
    "format_usd",
    "to_micros",
    "to_usd",
    "usd",
]
