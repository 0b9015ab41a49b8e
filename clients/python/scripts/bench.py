"""Latency the Python client adds: p50 of `me()` and of a paid x402 fetch through `spendcap.Agent`
against the same request sent with plain `httpx` (same keep-alive connection pooling), on
`spendcap demo --providers-only`. A benchmark that prints a table, not a timed test.

    clients/python/.venv/bin/python clients/python/scripts/bench.py [rounds]

The binary is `$SPENDCAP_BIN` (default `<repo>/target/debug/spendcap`). The two ways alternate
call by call, so drift on the machine affects both alike.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from spendcap import Agent, Spendcap

from conftest import binary, start_daemon


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    process, env = start_daemon()
    try:
        url, x402 = env["SPENDCAP_URL"], env["SPENDCAP_SIM_X402_URL"] + "/search"
        admin = Spendcap(env["SPENDCAP_ADMIN_TOKEN"], url=url)
        # A big cap and no runaway-loop breaker: every fetch below is a new $0.02 payment.
        created = admin.create_agent(f"bench-{uuid.uuid4().hex[:8]}", "1000", controls={"breaker": None})
        agent = Agent(created.token, url=url)
        plain = httpx.Client(headers={"Authorization": f"Bearer {created.token}"}, timeout=60)

        def client_fetch() -> None:
            agent.fetch(x402, task="bench", idempotency_key=uuid.uuid4().hex)

        def plain_fetch() -> None:
            body = {"url": x402, "task": "bench"}
            plain.post(f"{url}/v1/x402/fetch", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}).json()

        cases: list[tuple[str, Callable[[], object], Callable[[], object], int]] = [
            ("me()", agent.me, lambda: plain.get(f"{url}/v1/me").json(), rounds),
            ("paid x402 fetch ($0.02)", client_fetch, plain_fetch, max(rounds // 3, 20)),
        ]
        print(f"rounds: {rounds} me(), {max(rounds // 3, 20)} fetches each way; binary {binary()}")
        print("| call | spendcap client p50 | plain httpx p50 | added p50 | client p90 | httpx p90 |")
        print("|---|---|---|---|---|---|")
        for name, through_client, through_httpx, n in cases:
            for _ in range(10):  # warm both connection pools
                through_client()
                through_httpx()
            ours, theirs = [], []
            for _ in range(n):
                ours.append(timed(through_client))
                theirs.append(timed(through_httpx))
            p50, q50 = statistics.median(ours), statistics.median(theirs)
            p90, q90 = statistics.quantiles(ours, n=10)[-1], statistics.quantiles(theirs, n=10)[-1]
            print(f"| {name} | {p50:.3f} ms | {q50:.3f} ms | {p50 - q50:+.3f} ms | {p90:.3f} ms | {q90:.3f} ms |")
        spent = agent.me().spent_micros
        print(f"spent by the benchmark agent: {spent} micros")
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
