"""What the sync and async clients share: configuration, reading answers, and the retry rule."""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

import httpx

from ._calls import Call
from ._errors import OutcomeUnknown, SpendcapError, error_from_response

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8402"
# A paid fetch waits for the upstream (30 s by default in the daemon) and a settlement.
DEFAULT_TIMEOUT = httpx.Timeout(90.0, connect=10.0)
# Paying calls whose outcome is unknown are sent again with the same key this many times.
DEFAULT_OUTCOME_RETRIES = 3
USER_AGENT = "spendcap-python/0.1.0"


def base_url(url: str | None) -> str:
    return (url or os.environ.get("SPENDCAP_URL") or DEFAULT_URL).rstrip("/")


def token_from(token: str | None, variable: str, who: str) -> str:
    found = token or os.environ.get(variable)
    if not found:
        raise ValueError(f"no {who} token: pass token= or set {variable}")
    return found


def agent_id_of(token: str) -> str | None:
    """The agent id a token names (`sct_<agent id>_<secret>`), without asking the daemon."""
    if not token.startswith("sct_"):
        return None
    agent, _, _ = token.removeprefix("sct_").rpartition("_")
    return agent or None


def headers_for(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}


def request_args(call: Call[Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"params": call.params, "headers": call.headers}
    if call.body is not None or call.method in ("POST", "PUT"):
        args["json"] = call.body if call.body is not None else {}
    return args


def body_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def parse(call: Call[T], response: httpx.Response) -> T:
    """The answer of a call, or its typed error."""
    if not response.is_success:
        raise error_from_response(response.status_code, body_of(response))
    # 202: held, waiting for a person's approval; nothing was sent (`ApprovalRequired`).
    if response.status_code == 202:
        body = body_of(response)
        if isinstance(body, dict) and body.get("code") == "approval_required":
            raise error_from_response(202, body)
    if call.jsonl:
        return call.parse([json.loads(line) for line in response.text.splitlines() if line.strip()])
    return call.parse(response.json())


def should_retry(call: Call[Any], error: Exception, attempt: int, retries: int) -> bool:
    """A paying call is sent again (same key) when its outcome is unknown: the daemon answered
    `*_outcome_unknown`, the first attempt is still in flight, or the answer was lost."""
    if not call.retry or attempt >= retries:
        return False
    if isinstance(error, OutcomeUnknown):
        return True
    if isinstance(error, SpendcapError):
        return error.code == "idempotency_in_flight"
    return isinstance(error, httpx.TransportError)


def backoff(attempt: int) -> float:
    """Seconds before retry `attempt` (1, 2, ...): 0.25, 0.5, 1, 2, capped at 4."""
    return float(min(0.25 * 2 ** (attempt - 1), 4.0))
