"""The tests run against a real daemon with real simulated providers:
`spendcap demo --providers-only --listen 127.0.0.1:0` (binary from `$SPENDCAP_BIN`, default the
repository's `target/debug/spendcap`), whose printed `export` lines are the environment an agent
needs."""

from __future__ import annotations

import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from spendcap import Agent, Spendcap

REPO = Path(__file__).resolve().parents[3]
LAST_EXPORT = "SPENDCAP_SIM_AP2_USER_URL"


@dataclass(frozen=True)
class Daemon:
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.env["SPENDCAP_URL"]

    @property
    def admin_token(self) -> str:
        return self.env["SPENDCAP_ADMIN_TOKEN"]

    @property
    def x402_url(self) -> str:
        return self.env["SPENDCAP_SIM_X402_URL"]

    @property
    def acp_merchant(self) -> str:
        return self.env["SPENDCAP_SIM_ACP_MERCHANT"]

    def ap2_mandates(self, jwk: dict[str, Any], budget_cents: int = 500, max_payment_cents: int = 100) -> Any:
        """Open mandates the simulated user signs for an agent's AP2 key."""
        body = {
            "jwk": jwk,
            "items": ["sku_company_profile"],
            "budget_cents": budget_cents,
            "max_payment_cents": max_payment_cents,
        }
        return httpx.post(f"{self.env['SPENDCAP_SIM_AP2_USER_URL']}/mandates", json=body).raise_for_status().json()

    def ap2_checkout(self) -> str:
        """A merchant-signed checkout of one company profile ($0.30)."""
        url = f"{self.env['SPENDCAP_SIM_AP2_MERCHANT_URL']}/checkouts"
        return str(httpx.post(url, json={"items": ["sku_company_profile"]}).raise_for_status().json()["checkout_jwt"])


def binary() -> str:
    path = os.environ.get("SPENDCAP_BIN") or str(REPO / "target" / "debug" / "spendcap")
    if not Path(path).exists():
        pytest.exit(f"no spendcap binary at {path}: run `cargo build` or set SPENDCAP_BIN", returncode=2)
    return path


def start_daemon(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict[str, str]]:
    process = subprocess.Popen(
        [binary(), "demo", "--providers-only", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(extra_env or {})},
    )
    env: dict[str, str] = {}
    done = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("export ") and "=" in line:
                name, _, value = line.removeprefix("export ").strip().partition("=")
                env[name] = value
                if name == LAST_EXPORT:
                    done.set()
                    break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout=60) or LAST_EXPORT not in env:
        process.kill()
        raise RuntimeError(f"spendcap demo --providers-only printed no environment: {env}")
    return process, env


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    process, env = start_daemon()
    try:
        yield Daemon(env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def admin(daemon: Daemon) -> Iterator[Spendcap]:
    with Spendcap(daemon.admin_token, url=daemon.url) as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def new_agent(admin: Spendcap) -> Iterator[Any]:
    """Makes agents with fresh handles: `new_agent("1.00")` → (info, Agent client)."""
    made: list[Agent] = []

    def make(cap: str, **kwargs: Any) -> tuple[Any, Agent]:
        created = admin.create_agent(unique(kwargs.pop("prefix", "t")), cap, **kwargs)
        client = admin.agent_client(created.token)
        made.append(client)
        return created.agent, client

    yield make
    for client in made:
        client.close()
