"""The asynchronous clients, with the same surface as the sync ones: `AsyncSpendcap`, `AsyncAgent`."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx

from . import _calls as calls
from ._base import (
    DEFAULT_OUTCOME_RETRIES,
    DEFAULT_TIMEOUT,
    agent_id_of,
    backoff,
    base_url,
    headers_for,
    parse,
    request_args,
    should_retry,
    token_from,
)
from ._errors import TransportError, error_from_response
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
)
from ._money import Money
from ._spend import Spend
from .receipts import ChainReport, verify_chain

T = TypeVar("T")


class _Client:
    def __init__(
        self,
        token: str,
        url: str | None,
        timeout: httpx.Timeout | float | None,
        outcome_retries: int,
        http_client: httpx.AsyncClient | None,
    ) -> None:
        self.url = base_url(url)
        self._token = token
        self.outcome_retries = outcome_retries
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout or DEFAULT_TIMEOUT)
        self._headers = headers_for(token)

    async def _send(self, call: calls.Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, self.url + call.path, **_merge_headers(request_args(call), self._headers)
                )
                return parse(call, response)
            except Exception as error:
                attempt += 1
                if should_retry(call, error, attempt - 1, self.outcome_retries):
                    await asyncio.sleep(backoff(attempt))
                    continue
                if isinstance(error, httpx.TransportError):
                    raise TransportError(f"{type(error).__name__}: {error}") from error
                raise

    async def _stream_lines(self, path: str, params: Mapping[str, str]) -> AsyncIterator[str]:
        async with self._http.stream("GET", self.url + path, params=params, headers=self._headers) as response:
            if not response.is_success:
                await response.aread()
                raise error_from_response(response.status_code, _json_or_none(response))
            async for line in response.aiter_lines():
                yield line

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()


def _merge_headers(args: dict[str, Any], auth: Mapping[str, str]) -> dict[str, Any]:
    args["headers"] = {**auth, **(args.get("headers") or {})}
    return args


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class AsyncSpendcap(_Client):
    """The admin client: agents, caps, revocation, outcomes, reports, log, receipts.

    `Spendcap()` reads `SPENDCAP_URL` (default `http://127.0.0.1:8402`) and `SPENDCAP_ADMIN_TOKEN`.
    Dollar amounts are `Decimal`, exact text (`"1.50"`) or whole-dollar `int`; never floats.
    """

    def __init__(
        self,
        admin_token: str | None = None,
        *,
        url: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        outcome_retries: int = DEFAULT_OUTCOME_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        token = token_from(admin_token, "SPENDCAP_ADMIN_TOKEN", "admin")
        super().__init__(token, url, timeout, outcome_retries, http_client)
        self._timeout = timeout

    async def __aenter__(self) -> AsyncSpendcap:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def create_agent(
        self,
        handle: str,
        cap: Money,
        *,
        parent: str | None = None,
        ttl_secs: int | None = None,
        expires_at_ms: int | None = None,
        labels: Mapping[str, str] | None = None,
        controls: Mapping[str, Any] | None = None,
        task: str | None = None,
    ) -> CreatedAgent:
        """A new agent with its own cap (and its token, shown once)."""
        return await self._send(
            calls.create_agent(
                handle,
                cap,
                parent=parent,
                ttl_secs=ttl_secs,
                expires_at_ms=expires_at_ms,
                labels=labels,
                controls=controls,
                task=task,
            )
        )

    async def agents(self) -> list[AgentInfo]:
        return await self._send(calls.list_agents())

    async def agent(self, agent: str) -> AgentInfo:
        """One agent, by id or handle."""
        return await self._send(calls.get_agent(agent))

    async def set_cap(self, agent: str, cap: Money) -> AgentInfo:
        return await self._send(calls.set_cap(agent, cap))

    async def revoke(self, agent: str, reason: str) -> Revoked:
        """Cuts the agent and all its sub-agents off on every daemon instance, at once."""
        return await self._send(calls.revoke(agent, reason))

    async def rotate_token(self, agent: str) -> RotatedToken:
        return await self._send(calls.rotate_token(agent))

    async def controls(self, agent: str) -> dict[str, Any]:
        return await self._send(calls.get_controls(agent))

    async def set_controls(self, agent: str, controls: Mapping[str, Any]) -> dict[str, Any]:
        return await self._send(calls.set_controls(agent, controls))

    async def approvals(self, state: str | None = None) -> list[dict[str, Any]]:
        """Payments waiting for (or decided about) a person's approval, newest first."""
        return list((await self._send(calls.approvals(state)))["approvals"])

    async def approve(self, approval_id: str, note: str = "") -> dict[str, Any]:
        """Approves a waiting payment: the agent's repeated call pays it from its reservation."""
        return await self._send(calls.decide_approval(approval_id, "approve", note))

    async def deny(self, approval_id: str, note: str = "") -> dict[str, Any]:
        """Denies a waiting payment: its money is released."""
        return await self._send(calls.decide_approval(approval_id, "deny", note))

    async def reinstate(self, agent: str) -> dict[str, Any]:
        return await self._send(calls.reinstate(agent))

    async def create_operator(self, name: str, role: str, *, tree: str | None = None) -> dict[str, Any]:
        """A named token with a role (`viewer`, `operator`, `admin`), optionally limited to the budget
        tree of agent `tree`; the answer's `token` is shown only here."""
        return await self._send(calls.create_operator(name, role, tree=tree))

    async def operators(self) -> list[dict[str, Any]]:
        """Every operator token's name, role, tree and dates (never a token)."""
        return await self._send(calls.list_operators())

    async def revoke_operator(self, name: str) -> dict[str, Any]:
        """The token stops at once, on every instance of the daemon."""
        return await self._send(calls.revoke_operator(name))

    async def whoami(self) -> dict[str, Any]:
        """This client's token: `name`, `role`, `tree`, `actions`, `tighten_only`."""
        return await self._send(calls.whoami())

    async def record_outcome(self, agent: str, task: str, outcome: str, *, task_type: str) -> TaskOutcome:
        """How one of the agent's tasks ended: `success`, `failed` or `abandoned`."""
        return await self._send(calls.record_outcome(task, outcome, task_type, agent=agent))

    async def report(
        self, *, agent: str | None = None, since_ms: int | None = None, until_ms: int | None = None
    ) -> dict[str, Any]:
        """Cost per task type (with the suggested cap), agents, services, protocols, refusals."""
        return await self._send(calls.report(agent=agent, since_ms=since_ms, until_ms=until_ms))

    async def spend(self, group_by: str = "agent", **filters: Any) -> list[dict[str, Any]]:
        return await self._send(calls.spend(group_by, **filters))

    async def log(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        """Every log line item (filters: agent, task, service, protocol, since_ms, until_ms),
        streamed page by page as the daemon sends them."""
        async for line in self._stream_lines("/v1/log", calls.log_params("jsonl", **filters)):
            if line.strip():
                yield json.loads(line)

    async def log_csv(self, **filters: Any) -> AsyncIterator[str]:
        """The log as CSV lines (header first), streamed."""
        async for line in self._stream_lines("/v1/log", calls.log_params("csv", **filters)):
            yield line

    async def receipts(self, agent: str) -> list[Receipt]:
        """The signed receipt chain of the agent's budget tree, in sequence."""
        return await self._send(calls.receipts(agent))

    async def receipt_key(self) -> ReceiptKey:
        return await self._send(calls.receipt_key())

    async def verify_receipts(self, receipts: Sequence[Receipt], public_key: str | None = None) -> ChainReport:
        """Checks every signature and the hash chain, offline (the key is fetched when not given)."""
        return verify_chain(receipts, public_key or (await self.receipt_key()).public_key)

    async def ap2_key(self, agent: str) -> Ap2Key:
        return await self._send(calls.admin_ap2_key(agent))

    def agent_client(self, token: str) -> AsyncAgent:
        """An `AsyncAgent` client for a token, talking to the same daemon."""
        return AsyncAgent(token, url=self.url, timeout=self._timeout, outcome_retries=self.outcome_retries)

    @asynccontextmanager
    async def run(
        self,
        cap: Money,
        *,
        handle: str | None = None,
        parent: str | None = None,
        ttl_secs: int | None = None,
        labels: Mapping[str, str] | None = None,
        controls: Mapping[str, Any] | None = None,
        task: str | None = None,
        reason: str = "run_ended",
    ) -> AsyncIterator[AsyncAgent]:
        """An isolated agent for one run: created with its own cap, revoked when the block exits,
        whatever the exit. Yields its `Agent` client."""
        created = await self.create_agent(
            handle or f"run-{uuid.uuid4().hex[:12]}",
            cap,
            parent=parent,
            ttl_secs=ttl_secs,
            labels=labels,
            controls=controls,
            task=task,
        )
        agent = self.agent_client(created.token)
        agent.info = created.agent
        try:
            yield agent
        finally:
            try:
                await self.revoke(created.agent.id, reason)
            finally:
                await agent.aclose()


class AsyncAgent(_Client):
    """The agent client: its budget, generic holds, x402, ACP, AP2, task outcomes.

    `Agent()` reads `SPENDCAP_URL` and `SPENDCAP_AGENT_TOKEN`. Paying calls take an
    `idempotency_key`; when the outcome is unknown the client sends the call again with the same
    key, up to `outcome_retries` times, and then raises `OutcomeUnknown`.
    """

    info: AgentInfo | None

    def __init__(
        self,
        token: str | None = None,
        *,
        url: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        outcome_retries: int = DEFAULT_OUTCOME_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        agent_token = token_from(token, "SPENDCAP_AGENT_TOKEN", "agent")
        super().__init__(agent_token, url, timeout, outcome_retries, http_client)
        self.info = None

    async def __aenter__(self) -> AsyncAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def token(self) -> str:
        """The bearer token, to hand to tools that pay (never logged by this client)."""
        return self._token

    @property
    def id(self) -> str | None:
        return agent_id_of(self._token)

    def __repr__(self) -> str:
        return f"Agent(id={self.id!r}, url={self.url!r})"

    async def me(self) -> Budget:
        return await self._send(calls.me())

    async def approvals(self, state: str | None = None) -> list[dict[str, Any]]:
        """This agent's own approvals of the last week, newest first, optionally in one state
        (`pending`, `approved`, `denied`, `expired`, `canceled`): how a process that did not make
        the payment finds what waits for a person."""
        return list((await self._send(calls.own_approvals(state)))["approvals"])

    async def wait_for_approval(self, approval_id: str, *, wait_secs: int = 30) -> dict[str, Any]:
        """The approval of a payment that raised `ApprovalRequired`, waiting up to `wait_secs`
        (at most 60) for a person's decision: its `state` is then `approved` (repeat the call
        with the same idempotency key), `denied`, `expired` or still `pending`."""
        return await self._send(calls.own_approval(approval_id, wait_secs))

    async def hold(
        self,
        amount: Money,
        *,
        service: str,
        task: str = "",
        ttl_secs: int | None = None,
        details: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserves `amount` against the cap (and every ancestor's) before a paid call."""
        return await self._send(
            calls.hold(
                amount, service=service, task=task, ttl_secs=ttl_secs, details=details, idempotency_key=idempotency_key
            )
        )

    async def settle(self, hold_id: str, amount: Money, *, details: Mapping[str, str] | None = None) -> Settlement:
        """Spends what the call really cost (at most the hold); the rest goes back."""
        return await self._send(calls.settle(hold_id, amount, details=details))

    async def void(self, hold_id: str, *, reason: str | None = None) -> Voided:
        """Releases a hold: no money moved."""
        return await self._send(calls.void(hold_id, reason=reason))

    @asynccontextmanager
    async def spend(
        self,
        estimate: Money,
        *,
        service: str,
        task: str = "",
        ttl_secs: int | None = None,
        details: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[Spend]:
        """Holds `estimate`, then settles what the block reports with `spend.charge(cost)` (the
        whole estimate if it reports nothing). On an exception the hold is voided, unless a cost
        was already reported: a known charge is always settled."""
        held = await self.hold(
            estimate, service=service, task=task, ttl_secs=ttl_secs, details=details, idempotency_key=idempotency_key
        )
        spending = Spend(held)
        try:
            yield spending
        except BaseException:
            if spending.cost_micros is None:
                spending.voided = await self.void(held.hold_id, reason="call_failed")
            else:
                spending.settlement = await self.settle(
                    held.hold_id, spending.settle_micros(), details=spending.details
                )
            raise
        spending.settlement = await self.settle(held.hold_id, spending.settle_micros(), details=spending.details)

    async def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: str | bytes | None = None,
        json: Any = None,
        task: str = "",
        max_usd: Money | None = None,
        idempotency_key: str | None = None,
    ) -> FetchResult:
        """Fetches `url` through the daemon, paying its x402 402 within the cap. The upstream's own
        status (a 402 it answers after payment, a 404) is `result.status`; spendcap's refusals
        raise. Without a key, the same request in the same task is the same purchase."""
        return await self._send(
            calls.fetch(
                url,
                method=method,
                headers=headers,
                body=body,
                json_body=json,
                task=task,
                max_usd=max_usd,
                idempotency_key=idempotency_key,
            )
        )

    async def checkout(
        self,
        merchant: str,
        checkout_session_id: str | None = None,
        *,
        items: Sequence[str | Mapping[str, Any]] | None = None,
        task: str = "",
        currency: str | None = None,
        buyer: Mapping[str, Any] | None = None,
        fulfillment_details: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Checkout:
        """Pays an ACP checkout session (or one created from `items`) with the owner's card."""
        return await self._send(
            calls.checkout(
                merchant,
                checkout_session_id,
                items=items,
                task=task,
                currency=currency,
                buyer=buyer,
                fulfillment_details=fulfillment_details,
                idempotency_key=idempotency_key,
            )
        )

    async def cancel(self, checkout_session_id: str, *, merchant: str, hold_id: str | None = None) -> Canceled:
        """Cancels an ACP session (and voids the hold an `acp_outcome_unknown` answer named)."""
        return await self._send(calls.cancel(checkout_session_id, merchant=merchant, hold_id=hold_id))

    async def ap2_key(self) -> Ap2Key:
        return await self._send(calls.ap2_key())

    async def register_mandates(self, open_checkout_mandate: str, open_payment_mandate: str) -> dict[str, Any]:
        return await self._send(calls.register_mandates(open_checkout_mandate, open_payment_mandate))

    async def mandate(self, mandate_id: str) -> dict[str, Any]:
        return await self._send(calls.mandate(mandate_id))

    async def pay(
        self,
        checkout_jwt: str,
        *,
        open_checkout_mandate: str,
        open_payment_mandate: str,
        task: str = "",
        merchant: str | None = None,
        idempotency_key: str | None = None,
    ) -> Ap2Payment:
        """Pays a merchant-signed AP2 checkout within the cap and the open mandate's budget."""
        return await self._send(
            calls.ap2_pay(
                checkout_jwt,
                open_checkout_mandate=open_checkout_mandate,
                open_payment_mandate=open_payment_mandate,
                task=task,
                merchant=merchant,
                idempotency_key=idempotency_key,
            )
        )

    async def record_outcome(self, task: str, outcome: str, *, task_type: str) -> TaskOutcome:
        return await self._send(calls.record_outcome(task, outcome, task_type))

    # ---- orchestrators: sub-agents funded from this agent's budget, task tokens -------------

    async def create_sub_agent(
        self,
        handle: str,
        cap: Money,
        *,
        ttl_secs: int | None = None,
        expires_at_ms: int | None = None,
        labels: Mapping[str, str] | None = None,
        controls: Mapping[str, Any] | None = None,
        task: str | None = None,
    ) -> CreatedAgent:
        """A sub-agent under this agent, funded from what it has left (its cap at most that, its
        controls no looser than this agent's); its token is shown once."""
        return await self._send(
            calls.create_sub_agent(
                handle,
                cap,
                ttl_secs=ttl_secs,
                expires_at_ms=expires_at_ms,
                labels=labels,
                controls=controls,
                task=task,
            )
        )

    async def sub_agents(self) -> list[AgentInfo]:
        """This agent's sub-agents, and theirs."""
        return await self._send(calls.sub_agents())

    async def revoke_sub_agent(self, agent: str, reason: str) -> Revoked:
        """Cuts one of this agent's descendants (and everything under it) off, at once."""
        return await self._send(calls.revoke_sub_agent(agent, reason))

    async def task_token(self, task: str, ttl_secs: int, *, agent: str | None = None) -> TaskToken:
        """A short-lived token for one task, of this agent or (`agent`) one of its descendants."""
        return await self._send(calls.task_token(task, ttl_secs, agent=agent))

    async def revoke_task_token(self, token_id: str) -> dict[str, Any]:
        return await self._send(calls.revoke_task_token(token_id))

    def transport(
        self,
        *,
        task: str = "",
        max_usd: Money | None = None,
        raise_refusals: bool = True,
        inner: httpx.AsyncBaseTransport | None = None,
    ) -> httpx.AsyncBaseTransport:
        """An `httpx` transport that sends every request through the daemon's x402 proxy, paying
        402s within the cap: `httpx.AsyncClient(transport=agent.transport())`."""
        from .transport import AsyncPayingTransport

        return AsyncPayingTransport(
            self.url,
            self._token,
            task=task,
            max_usd=max_usd,
            raise_refusals=raise_refusals,
            outcome_retries=self.outcome_retries,
            inner=inner,
        )
