"""A `requests` transport adapter that pays x402 through the daemon's proxy form
(`pip install 'spendcap[requests]'`).

    session = requests.Session()
    spendcap.requests_adapter.mount(session, agent, task="research-7")
    session.get("https://api.example.com/weather")   # paid within the agent's cap

Same rules as `spendcap.transport`: the application's `Authorization` goes upstream as
`X-Spendcap-Upstream-Authorization`; spendcap's own refusals (`X-Spendcap-Error`) raise typed
errors; an unknown outcome is retried with the request's idempotency key.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from ._base import backoff
from ._money import Money, to_micros
from ._sync import Agent
from .transport import ERROR_HEADER, key_of, proxy_headers, proxy_url, refusal, retryable


class SpendcapAdapter(HTTPAdapter):
    def __init__(
        self,
        url: str,
        token: str,
        *,
        task: str = "",
        max_usd: Money | None = None,
        raise_refusals: bool = True,
        outcome_retries: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._url = url
        self._token = token
        self._task = task
        self._max_micros = None if max_usd is None else to_micros(max_usd)
        self._raise_refusals = raise_refusals
        self._outcome_retries = outcome_retries

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        target = str(request.url)
        proxied = request.copy()
        proxied.url = proxy_url(self._url, target)
        headers = proxy_headers(
            request.headers,
            self._token,
            task=self._task,
            max_micros=self._max_micros,
            idempotency_key=key_of(request.headers),
        )
        proxied.headers = requests.structures.CaseInsensitiveDict(headers)
        proxied.prepare_content_length(request.body)
        attempt = 0
        while True:
            response = super().send(proxied, *args, **kwargs)
            code = response.headers.get(ERROR_HEADER)
            if code is None:
                break
            if retryable(code) and attempt < self._outcome_retries:
                attempt += 1
                response.close()
                time.sleep(backoff(attempt))
                continue
            if self._raise_refusals:
                raise refusal(response.status_code, response.content)
            break
        # To the application this is the answer of the URL it asked for.
        response.url = target
        response.request = request
        return response


def mount(
    session: requests.Session,
    agent: Agent,
    *,
    task: str = "",
    max_usd: Money | None = None,
    raise_refusals: bool = True,
) -> requests.Session:
    """Makes every `http://` and `https://` request of `session` pay through the daemon."""
    adapter = SpendcapAdapter(
        agent.url,
        agent.token,
        task=task,
        max_usd=max_usd,
        raise_refusals=raise_refusals,
        outcome_retries=agent.outcome_retries,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
