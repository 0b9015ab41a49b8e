"""Paying an x402 resource served by the official `x402` Python package, through the daemon.

The resource is a FastAPI app behind x402's own `payment_middleware` and `x402ResourceServer`,
whose facilitator is x402's own `x402Facilitator` with its exact-EVM scheme: the official code
builds the 402, checks the daemon's EIP-3009 authorization (EIP-712 signature recovery, amount,
payee, validity window, nonce state, transfer simulation) and settles it. Only the chain is
local: `LocalChain` answers the facilitator's contract reads and records each
`transferWithAuthorization` it is sent, with its `Transfer` event, instead of a Base Sepolia RPC.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from x402 import x402Facilitator, x402ResourceServer
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator
from x402.mechanisms.evm.exact.eip3009_utils import ERC20_TRANSFER_EVENT_TOPIC
from x402.mechanisms.evm.types import TransactionReceipt

from served import Served
from spendcap import BudgetRefused

NETWORK = "eip155:84532"  # Base Sepolia
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


class LocalChain(FacilitatorWeb3Signer):
    """x402's own web3 facilitator signer (its EIP-712 verification included), with the chain
    calls answered in memory: one USDC contract, the nonces it has used, the transfers made."""

    def __init__(self) -> None:
        super().__init__(private_key="0x" + secrets.token_hex(32), rpc_url="http://127.0.0.1:9")
        self.used: set[tuple[str, str]] = set()
        self.transfers: dict[str, tuple[str, str, int, str]] = {}  # tx -> (from, to, value, nonce)

    def read_contract(self, address: str, abi: Any, function_name: str, *args: Any) -> Any:
        if function_name == "balanceOf":
            return 10**12
        if function_name == "authorizationState":
            return (str(args[0]).lower(), _hex(args[1])) in self.used
        if function_name == "transferWithAuthorization":  # the simulation before settling
            if (str(args[0]).lower(), _hex(args[5])) in self.used:
                raise RuntimeError("FiatTokenV2: authorization is used or canceled")
            return None
        raise NotImplementedError(function_name)

    def write_contract(self, address: str, abi: Any, function_name: str, *args: Any, data_suffix: Any = None) -> str:
        assert (address.lower(), function_name) == (USDC.lower(), "transferWithAuthorization")
        payer, nonce = str(args[0]).lower(), _hex(args[5])
        if (payer, nonce) in self.used:
            raise RuntimeError("FiatTokenV2: authorization is used or canceled")
        self.used.add((payer, nonce))
        tx = "0x" + secrets.token_hex(32)
        self.transfers[tx] = (payer, str(args[1]).lower(), int(args[2]), nonce)
        return tx

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        payer, to, value, _ = self.transfers[tx_hash]

        def topic(address: str) -> str:
            return "0x" + address.removeprefix("0x").rjust(64, "0")

        log = {
            "address": USDC,
            "topics": [ERC20_TRANSFER_EVENT_TOPIC, topic(payer), topic(to)],
            "data": f"0x{value:064x}",
        }
        return TransactionReceipt(status=1, block_number=1, tx_hash=tx_hash, logs=[log])

    def send_transaction(self, to: str, data: bytes) -> str:
        raise NotImplementedError("no smart-wallet deployment here")

    def get_balance(self, address: str, token_address: str) -> int:
        return 10**12

    def get_chain_id(self) -> int:
        return 84532

    def get_code(self, address: str) -> bytes:
        # The token is a contract; payers are plain accounts (EOAs).
        return b"\x60\x80" if address.lower() == USDC.lower() else b""


def _hex(value: Any) -> str:
    return ("0x" + value.hex() if isinstance(value, (bytes, bytearray)) else str(value)).lower()


class OfficialResource:
    def __init__(self) -> None:
        self.chain = LocalChain()
        facilitator = x402Facilitator()
        register_exact_evm_facilitator(facilitator, self.chain, networks=NETWORK)
        server = x402ResourceServer(facilitator)
        # x402 2.25's own annotations disagree with each other here (its server scheme vs. its protocol).
        server.register(NETWORK, ExactEvmServerScheme())  # type: ignore[no-untyped-call,arg-type]
        routes: Any = {
            "GET /weather": {"accepts": {"scheme": "exact", "payTo": PAY_TO, "price": "$0.01", "network": NETWORK}}
        }
        middleware = payment_middleware(routes, server)
        app = FastAPI()

        @app.middleware("http")
        async def x402(request: Request, call_next: Any) -> Response:
            return await middleware(request, call_next)

        @app.get("/weather")
        async def weather() -> dict[str, str]:
            return {"city": "Paris", "sky": "clear"}

        self.served = Served(app, "the x402 FastAPI server")
        self.url = f"http://127.0.0.1:{self.served.port}/weather"


@pytest.fixture(scope="module")
def official() -> Iterator[OfficialResource]:
    resource = OfficialResource()
    yield resource
    resource.served.stop()


def test_the_official_x402_server_is_paid_once_per_purchase_within_the_cap(
    official: OfficialResource, new_agent: Any
) -> None:
    # Without spendcap the official server asks for payment.
    assert httpx.get(official.url).status_code == 402

    _, agent = new_agent("0.025")
    paid = agent.fetch(official.url, task="weather", idempotency_key="weather-1")
    assert (paid.status, paid.json()) == (200, {"city": "Paris", "sky": "clear"})
    assert paid.payment is not None and paid.payment.status == "settled"
    assert paid.payment.transaction in official.chain.transfers
    payer, to, value, nonce = official.chain.transfers[paid.payment.transaction]
    assert (to, value, nonce) == (PAY_TO.lower(), 10_000, paid.payment.nonce.lower())
    assert payer == (paid.payment.payer or "").lower()

    # The same purchase again is a replay: the official facilitator is not asked twice.
    again = agent.fetch(official.url, task="weather", idempotency_key="weather-1")
    assert again.replayed and len(official.chain.transfers) == 1

    with httpx.Client(transport=agent.transport(task="weather")) as client:
        assert client.get(official.url).headers["x-spendcap-amount-micros"] == "10000"
        with pytest.raises(BudgetRefused) as refused:
            client.get(official.url)
    assert (refused.value.code, refused.value.remaining_micros) == ("cap_exceeded", 5_000)
    assert len(official.chain.transfers) == 2
    assert agent.me().spent_micros == 20_000
