"""An `httpx` transport that pays x402 through the daemon's proxy form.

`httpx.Client(transport=agent.transport(task="t"))` sends every request to
`<daemon>/v1/x402/proxy/<url>` with the agent's token; the daemon answers the upstream's 402 by
paying within the cap and hands back the upstream's answer verbatim (plus `X-Spendcap-*`
headers). The application's own `Authorization` header goes upstream as
`X-Spendcap-Upstream-Authorization`.

spendcap's own refusals carry `X-Spendcap-Error: <code>`; the transport raises them as typed
errors (`BudgetRefused`, ...), so they are never mistaken for an upstream's own 402. Each request
is one purchase with its own idempotency key (the request's `Idempotency-Key` or
`X-Spendcap-Idempotency-Key` header when it has one); an unknown outcome is retried with that key.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from ._base import agent_id_of, backoff
from ._calls import new_idempotency_key
from ._errors import SpendcapError, error_from_response
from ._money import Money, to_micros

PROXY_PREFIX = "/v1/x402/proxy/"
ERROR_HEADER = "x-spendcap-error"
_NOT_FORWARDED = frozenset({"host", "authorization", "content-length", "transfer-encoding", "connection"})


def proxy_url(base: str, target: str) -> str:
    return f"{base.rstrip('/')}{PROXY_PREFIX}{target}"


def proxy_headers(
    headers: Any,
    token: str,
    *,
    task: str,
    max_micros: int | None,
    idempotency_key: str,
) -> list[tuple[str, str]]:
    """The headers of the proxied request: the application's, its `Authorization` renamed, and
    spendcap's own."""
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower == "authorization":
            out.append(("X-Spendcap-Upstream-Authorization", value))
        elif lower not in _NOT_FORWARDED and not lower.startswith("x-spendcap-"):
            out.append((name, value))
    out.append(("Authorization", f"Bearer {token}"))
    out.append(("X-Spendcap-Idempotency-Key", idempotency_key))
    if task:
        out.append(("X-Spendcap-Task", task))
    if max_micros is not None:
        out.append(("X-Spendcap-Max-Amount-Micros", str(max_micros)))
    return out


def key_of(headers: Any) -> str:
    return str(headers.get("x-spendcap-idempotency-key") or headers.get("idempotency-key") or new_idempotency_key())


def refusal(status: int, content: bytes) -> SpendcapError:
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    return error_from_response(status, body)


def retryable(code: str) -> bool:
    return code.endswith("outcome_unknown") or code == "idempotency_in_flight"


class _Settings:
    def __init__(
        self,
        url: str,
        token: str,
        task: str,
        max_usd: Money | None,
        raise_refusals: bool,
        outcome_retries: int,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.task = task
        self.max_micros = None if max_usd is None else to_micros(max_usd)
        self.raise_refusals = raise_refusals
        self.outcome_retries = outcome_retries

    def proxied(self, request: httpx.Request, content: bytes) -> httpx.Request:
        headers = proxy_headers(
            request.headers,
            self.token,
            task=self.task,
            max_micros=self.max_micros,
            idempotency_key=key_of(request.headers),
        )
        return httpx.Request(
            request.method,
            proxy_url(self.url, str(request.url)),
            headers=headers,
            content=content,
            extensions=request.extensions,
        )

    def __repr__(self) -> str:
        return f"agent={agent_id_of(self.token)!r}, url={self.url!r}, task={self.task!r}"


class PayingTransport(httpx.BaseTransport):
    """Sync transport; see the module docstring."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        task: str = "",
        max_usd: Money | None = None,
        raise_refusals: bool = True,
        outcome_retries: int = 3,
        inner: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(url, token, task, max_usd, raise_refusals, outcome_retries)
        self._inner = inner or httpx.HTTPTransport()

    def __repr__(self) -> str:
        return f"PayingTransport({self._settings!r})"

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        content = request.read()
        proxied = self._settings.proxied(request, content)
        attempt = 0
        while True:
            response = self._inner.handle_request(proxied)
            code = response.headers.get(ERROR_HEADER)
            if code is None:
                return response
            body = response.read()
            response.close()
            if retryable(code) and attempt < self._settings.outcome_retries:
                attempt += 1
                time.sleep(backoff(attempt))
                continue
            if self._settings.raise_refusals:
                raise refusal(response.status_code, body)
            return httpx.Response(response.status_code, headers=response.headers, content=body)

    def close(self) -> None:
        self._inner.close()


class AsyncPayingTransport(httpx.AsyncBaseTransport):
    """Async transport; see the module docstring."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        task: str = "",
        max_usd: Money | None = None,
        raise_refusals: bool = True,
        outcome_retries: int = 3,
        inner: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = _Settings(url, token, task, max_usd, raise_refusals, outcome_retries)
        self._inner = inner or httpx.AsyncHTTPTransport()

    def __repr__(self) -> str:
        return f"AsyncPayingTransport({self._settings!r})"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        proxied = self._settings.proxied(request, content)
        attempt = 0
        while True:
            response = await self._inner.handle_async_request(proxied)
            code = response.headers.get(ERROR_HEADER)
            if code is None:
                return response
            body = await response.aread()
            await response.aclose()
            if retryable(code) and attempt < self._settings.outcome_retries:
                attempt += 1
                await asyncio.sleep(backoff(attempt))
                continue
            if self._settings.raise_refusals:
                raise refusal(response.status_code, body)
            return httpx.Response(response.status_code, headers=response.headers, content=body)

    async def aclose(self) -> None:
        await self._inner.aclose()
