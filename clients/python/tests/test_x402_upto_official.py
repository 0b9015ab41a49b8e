"""Paying an x402 `upto` resource served by the official `x402` Python package, through the daemon.

The resource is a FastAPI app behind x402's own `payment_middleware` with its `UptoEvmServerScheme`
(the 402 asks for a maximum, Permit2, and the facilitator's address), whose facilitator is x402's
own `x402Facilitator` with `UptoEvmFacilitatorScheme`: the official code checks the daemon's
Permit2 witness authorization (EIP-712 signature recovery, spender, payee, facilitator, amount,
window) and settles the amount the handler reports as used (`set_settlement_overrides`). Only the
chain is local: `UptoChain` answers the contract reads and records each proxy `settle`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from x402 import x402Facilitator, x402ResourceServer
from x402.http.middleware.fastapi import payment_middleware, set_settlement_overrides
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.types import TransactionReceipt
from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme, UptoEvmServerScheme

from served import Served
from spendcap import BudgetRefused

NETWORK = "eip155:84532"  # Base Sepolia
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


class UptoChain(FacilitatorWeb3Signer):
    """x402's own web3 facilitator signer (its EIP-712 verification included), with the chain
    answered in memory: Permit2 approved, balances ample, each proxy `settle` recorded once per
    (owner, nonce)."""

    def __init__(self) -> None:
        super().__init__(private_key="0x" + secrets.token_hex(32), rpc_url="http://127.0.0.1:9")
        self.used: set[tuple[str, int]] = set()
        self.settled: dict[str, tuple[str, str, int, int]] = {}  # tx -> (owner, to, amount, maximum)

    def read_contract(self, address: str, abi: Any, function_name: str, *args: Any) -> Any:
        if function_name in ("balanceOf", "allowance"):
            return 10**12
        if function_name == "settle":  # the simulation before verifying and settling
            permit, _amount, owner = args[0], args[1], str(args[2]).lower()
            if (owner, int(permit[1])) in self.used:
                raise RuntimeError("InvalidNonce")
            return None
        raise NotImplementedError(function_name)

    def write_contract(self, address: str, abi: Any, function_name: str, *args: Any, data_suffix: Any = None) -> str:
        assert function_name == "settle", function_name
        permit, amount, owner, witness = args[0], int(args[1]), str(args[2]).lower(), args[3]
        if amount > int(permit[0][1]):
            raise RuntimeError("AmountExceedsPermitted")
        if (owner, int(permit[1])) in self.used:
            raise RuntimeError("InvalidNonce")
        self.used.add((owner, int(permit[1])))
        tx = "0x" + secrets.token_hex(32)
        self.settled[tx] = (owner, str(witness[0]).lower(), amount, int(permit[0][1]))
        return tx

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        return TransactionReceipt(status=1, block_number=1, tx_hash=tx_hash, logs=[])

    def send_transaction(self, to: str, data: bytes) -> str:
        raise NotImplementedError("no smart-wallet deployment here")

    def get_balance(self, address: str, token_address: str) -> int:
        return 10**12

    def get_chain_id(self) -> int:
        return 84532

    def get_code(self, address: str) -> bytes:
        return b"" if address.lower() not in (USDC.lower(),) else b"\x60\x80"


class OfficialUptoResource:
    def __init__(self) -> None:
        self.chain = UptoChain()
        facilitator = x402Facilitator()
        facilitator.register([NETWORK], UptoEvmFacilitatorScheme(self.chain))
        server = x402ResourceServer(facilitator)
        server.register(NETWORK, UptoEvmServerScheme())  # type: ignore[no-untyped-call,arg-type]
        routes: Any = {
            "GET /summarise": {"accepts": {"scheme": "upto", "payTo": PAY_TO, "price": "$0.05", "network": NETWORK}}
        }
        middleware = payment_middleware(routes, server)
        app = FastAPI()

        @app.middleware("http")
        async def x402(request: Request, call_next: Any) -> Response:
            return await middleware(request, call_next)

        @app.get("/summarise")
        async def summarise(response: Response, used: int = 12_000) -> dict[str, Any]:
            # What this request used, in USDC atomic units: what the server settles.
            set_settlement_overrides(response, {"amount": str(used)})
            return {"summary": "short", "used": used}

        self.served = Served(app, "the x402 FastAPI server")
        self.url = f"http://127.0.0.1:{self.served.port}/summarise"


@pytest.fixture(scope="module")
def official() -> Iterator[OfficialUptoResource]:
    resource = OfficialUptoResource()
    yield resource
    resource.served.stop()


def test_the_official_upto_server_settles_what_was_used_and_the_rest_is_released(
    official: OfficialUptoResource, new_agent: Any
) -> None:
    # Without spendcap the official server asks for a $0.05 maximum.
    assert httpx.get(official.url).status_code == 402

    _, agent = new_agent("0.08")
    paid = agent.fetch(official.url + "?used=12000", task="summary", idempotency_key="summary-1")
    assert (paid.status, paid.json()) == (200, {"summary": "short", "used": 12_000})
    assert paid.payment is not None and paid.payment.status == "settled"
    assert paid.payment.amount_micros == 12_000
    owner, to, amount, maximum = official.chain.settled[paid.payment.transaction or ""]
    assert (to, amount, maximum) == (PAY_TO.lower(), 12_000, 50_000)
    assert owner == (paid.payment.payer or "").lower()
    me = agent.me()
    assert (me.spent_micros, me.held_micros) == (12_000, 0)

    # The same purchase again is a replay: the official facilitator settles nothing more.
    again = agent.fetch(official.url + "?used=12000", task="summary", idempotency_key="summary-1")
    assert again.replayed and len(official.chain.settled) == 1

    # 0.068 left: a second $0.05 maximum is held (and 0.03 used); a third maximum does not fit.
    second = agent.fetch(official.url + "?used=30000", task="summary", idempotency_key="summary-2")
    assert second.payment is not None and second.payment.amount_micros == 30_000
    with pytest.raises(BudgetRefused) as refused:
        agent.fetch(official.url + "?used=1", task="summary", idempotency_key="summary-3")
    assert (refused.value.code, refused.value.remaining_micros) == ("cap_exceeded", 38_000)
    assert len(official.chain.settled) == 2
    assert agent.me().spent_micros == 42_000
