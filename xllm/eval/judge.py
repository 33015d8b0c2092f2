"""A client of any OpenAI-compatible chat-completions endpoint, with the standard library only.

Transient trouble (a timeout, a refused or dropped connection, HTTP 5xx, HTTP 429) is retried with exponential
backoff, a 429's ``Retry-After`` seconds taking the place of the backoff; any other HTTP error, a body that is
not JSON, or trouble that outlasts the retries raises ``JudgeError``, so a run stops rather than records a
review nobody got.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    """The endpoint could not give a reply: the message names the URL and what went wrong."""


@dataclass
class Reply:
    content: str | None  # the first choice's message; None when the server sent none (a filtered reply)
    model: str | None  # the model as the server reports it, which may differ from the one asked for
    finish_reason: str | None


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class ChatClient:
    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1: ``/chat/completions`` is added
    model: str
    api_key: str | None = None  # sent as a bearer token; local servers need none
    temperature: float = 0.2
    max_tokens: int = 1024
    seed: int | None = None  # sent only when set: not every server knows the field
    timeout: float = 120.0  # seconds for one request
    retries: int = 5
    backoff: float = 2.0  # seconds before the first retry, doubled before each next one

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def settings(self) -> dict:
        """What a review records of how it was asked for."""
        return {"base_url": self.base_url, "requested_model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed}

    def complete(self, messages: list[dict]) -> Reply:
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        if self.seed is not None:
            body["seed"] = self.seed
        attempt = 0
        while True:
            try:
                return self._post(body)
            except _Transient as trouble:
                if attempt == self.retries:
                    raise JudgeError(f"{self.url}: no reply after {attempt + 1} attempts; last: {trouble.reason}") \
                        from None
                wait = trouble.retry_after if trouble.retry_after is not None else self.backoff * 2 ** attempt
                attempt += 1
                log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", self.url, trouble.reason, wait,
                            attempt + 1, self.retries + 1)
                time.sleep(wait)

    def _post(self, body: dict) -> Reply:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode(errors="replace")
            if error.code == 429:
                raise _Transient(f"HTTP 429 {detail}", _seconds(error.headers.get("Retry-After"))) from None
            if error.code >= 500:
                raise _Transient(f"HTTP {error.code} {detail}") from None
            raise JudgeError(f"{self.url}: HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
            raise _Transient(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            content = choice["message"].get("content")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"{self.url}: not a chat-completions reply: {raw[:300]!r}") from None
        return Reply(content if isinstance(content, str) else None, reply.get("model"), choice.get("finish_reason"))


def _seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` given in seconds; None (the backoff applies) for an absent or dated one."""
    try:
        return max(0.0, float(retry_after)) if retry_after is not None else None
    except ValueError:
        return None
