"""Any OpenAI-compatible chat endpoint (e.g. `vllm serve`): `concurrency` requests in flight per
worker across batches (asyncio, no per-batch barrier), retries with exponential backoff on
timeouts, connection errors, 408, 429 and 5xx; other 4xx fail the request (pipelines.failures).
A circuit breaker (`Breaker`) holds every request while the endpoint fails them all, probes it
with one request at a time, and stops the run (EndpointOutageError) when it stays down for
`outage_timeout_s`: an outage costs waiting, never error rows.

Media travel as base64 JPEG data URLs; a video as its sampled frames (several images), which
every multimodal chat server accepts. `check_endpoint` and `ChatClient` (the
requests) are shared with the translate stage's openai engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, EngineLoop, FatalEngineError,
                                    Stopwatch, done_future, frames_of)
from pipelines.failures import http_kind

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
# Backoff before retry n (n >= 1): BACKOFF_BASE_S * 2**(n-1), capped at BACKOFF_MAX_S, times a
# jitter in [0.5, 1.5). Module constants so tests can shorten them.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
# The breaker opens after this many retryable failures in a row with no answer in between (one
# flaky request among working ones never opens it); while open, one probe request goes out
# every PROBE_INTERVAL_S, doubling to PROBE_MAX_S, and the others wait.
OPEN_AFTER_FAILURES = 5
PROBE_INTERVAL_S = 1.0
PROBE_MAX_S = 10.0
WAIT_POLL_S = 0.2

log = logging.getLogger(__name__)


def backoff_s(retry: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (retry - 1)) * (0.5 + random.random())


def _data_url(pixels: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class EndpointEngine:
    """What the describe and translate engines for an endpoint share: one ChatClient per worker,
    `concurrency` requests at the endpoint, twice that owed by the runner."""
    streaming = True

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.chat: ChatClient | None = None

    def setup(self) -> None:
        self.chat = ChatClient(self.cfg)
        self.chat.start()

    def close(self) -> None:
        """Release the connections and the engine loop (optional: a finished process does it too)."""
        if self.chat is not None:
            self.chat.close()
            self.chat = None

    def in_flight_target(self) -> int:
        return 2 * self.cfg.concurrency

    def in_flight(self) -> int:
        """Requests handed to the client and not finished: at most `concurrency` of them are at
        the endpoint, the rest wait for a slot (or for an open breaker)."""
        return self.chat.loop.pending if self.chat is not None and self.chat.loop is not None else 0


class OpenAIDescriber(EndpointEngine):
    def submit(self, requests: list[DescribeRequest]) -> list[Future]:
        assert self.chat is not None, "setup() first"
        futures = []
        urls: dict[int, list[str]] = {}   # the views of one item share its pixels: encode them once
        for request in requests:
            try:
                key = id(request.pixels)
                if key not in urls:
                    urls[key] = [_data_url(frame) for frame in frames_of(request)]
                futures.append(self.chat.submit(self._payload(request, urls[key])))
            except Exception as err:  # noqa: BLE001 - one unencodable request must not fail the batch
                futures.append(done_future(DescribeResult.failed(
                    "invalid_request", f"cannot encode the media: {type(err).__name__}: {err}")))
        return futures

    def describe(self, requests: list[DescribeRequest]) -> list[DescribeResult]:
        return [future.result() for future in self.submit(requests)]

    def _payload(self, request: DescribeRequest, urls: list[str]) -> dict[str, Any]:
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        parts.append({"type": "text", "text": request.prompt})
        return chat_payload(self.cfg, parts)


# --------------------------------------------------------------------------- shared with translate

class EndpointOutageError(FatalEngineError):
    """The endpoint failed every request for longer than the outage timeout: the run stops."""


class Breaker:
    """A circuit breaker for one worker's requests to one endpoint (all on its EngineLoop).

    Closed: requests go out. After OPEN_AFTER_FAILURES retryable failures in a row it opens:
    requests wait in `admit()` (the runner's window then fills up, so no new work is handed
    out either) while one probe request at a time tests the endpoint. The first answer closes
    it and everyone goes on. If the endpoint has failed for `outage_timeout_s` since its first
    failure in a row, every waiting request raises EndpointOutageError."""

    def __init__(self, endpoint: str, outage_timeout_s: float):
        self.endpoint, self.outage_timeout_s = endpoint, outage_timeout_s
        self.failures = 0                     # retryable failures in a row
        self.failing_since: float | None = None
        self.open = False
        self.probing = False
        self.probe_every = PROBE_INTERVAL_S
        self.next_probe = 0.0
        self.last_error: DescribeResult | None = None

    async def admit(self) -> bool:
        """Wait until a request may go out; True when it goes as the probe of an open breaker."""
        while self.open:
            now = time.monotonic()
            if self.failing_since is not None and now - self.failing_since > self.outage_timeout_s:
                raise self.outage(now)
            if not self.probing and now >= self.next_probe:
                self.probing = True
                return True
            await asyncio.sleep(WAIT_POLL_S)
        return False

    def answered(self) -> None:
        """The endpoint answered (any answer but a retryable failure): it is up."""
        if self.open:
            log.warning("endpoint %s answers again after %.0f s; going on", self.endpoint,
                        time.monotonic() - (self.failing_since or time.monotonic()))
        self.failures, self.failing_since, self.open, self.probing = 0, None, False, False
        self.probe_every = PROBE_INTERVAL_S

    def failed(self, error: DescribeResult, probe: bool) -> None:
        now = time.monotonic()
        self.failures += 1
        self.last_error = error
        self.failing_since = self.failing_since or now
        if probe:
            self.probing = False
            self.probe_every = min(PROBE_MAX_S, 2 * self.probe_every)
            self.next_probe = now + self.probe_every
        if not self.open and self.failures >= OPEN_AFTER_FAILURES:
            self.open, self.next_probe = True, now + self.probe_every
            log.warning("endpoint %s failed %d requests in a row (%s); holding requests and probing it for up "
                        "to %.0f s", self.endpoint, self.failures, error.error_kind, self.outage_timeout_s)

    def outage(self, now: float) -> EndpointOutageError:
        last = self.last_error
        reason = f"{last.error_kind}: {last.error}" if last else "unknown"
        return EndpointOutageError(
            f"endpoint {self.endpoint} failed every request for {now - (self.failing_since or now):.0f} s "
            f"(--outage-timeout {self.outage_timeout_s:g} s); last error: {reason[:500]}. Nothing was marked "
            f"failed for the outage: rerun the same command when the endpoint is back")


def check_endpoint(cfg: EngineConfig) -> None:
    """FatalEngineError unless cfg.base_url answers and serves cfg.model (else nothing could
    succeed). Used by the describe and translate engines before their first request."""
    import httpx
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    base_url = cfg.base_url.rstrip("/")
    with httpx.Client(headers=headers, timeout=cfg.timeout_s) as client:
        try:
            listed = client.get(f"{base_url}/models")
            listed.raise_for_status()
            served = [m.get("id") for m in listed.json().get("data", [])]
        except Exception as err:  # noqa: BLE001 - unreachable endpoint: nothing can succeed
            raise FatalEngineError(f"endpoint {base_url} is not usable: {type(err).__name__}: {err}") from err
    if cfg.model not in served:
        raise FatalEngineError(f"endpoint {base_url} does not serve model {cfg.model!r} "
                               f"(it serves: {', '.join(map(str, served)) or 'nothing'})")


def chat_payload(cfg: EngineConfig, content: Any) -> dict[str, Any]:
    """One user turn with the configured sampling (shared by describe and translate)."""
    s = cfg.sampling
    payload = {"model": cfg.model, "messages": [{"role": "user", "content": content}],
               "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed}
    if s.ignore_eos or s.repetition_penalty != 1.0:
        # vLLM extensions of the OpenAI schema; only sent when asked for
        payload.update(ignore_eos=s.ignore_eos, repetition_penalty=s.repetition_penalty)
    return payload


class ChatClient:
    """An async httpx client on an EngineLoop that keeps at most `concurrency` requests in
    flight per worker, across every batch handed in (no per-batch barrier): a batch's fast
    answers return while its slow ones are still out, and the next batches' requests take
    the free slots at once. Used by the describe and translate engines."""

    def __init__(self, cfg: EngineConfig):
        if cfg.concurrency < 1:
            raise FatalEngineError(f"concurrency must be >= 1, got {cfg.concurrency}")
        self.cfg = cfg
        self.url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        self.loop: EngineLoop | None = None

    def start(self) -> None:
        check_endpoint(self.cfg)   # an endpoint that is down or lacks the model fails here
        self.loop = EngineLoop()
        self.loop.run(self._open())

    async def _open(self) -> None:
        import httpx
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        # every connection kept alive: httpx keeps 20 by default, so at a higher concurrency the
        # rest were opened and closed per request, which costs a CPU-bound server its time
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        self.client = httpx.AsyncClient(headers=headers, timeout=self.cfg.timeout_s, limits=limits)
        self.slots = asyncio.Semaphore(self.cfg.concurrency)
        self.breaker = Breaker(self.cfg.base_url, self.cfg.outage_timeout_s)

    def submit(self, payload: dict[str, Any], then: Callable[[DescribeResult], DescribeResult] | None = None) -> Future:
        """Start one request; the future resolves as soon as it is answered (after retries), after
        `then` (per-request post-processing) ran on its result."""
        assert self.loop is not None, "start() first"

        async def one() -> DescribeResult:
            result = await self.complete(payload)
            return then(result) if then else result
        return self.loop.submit(one())

    async def complete(self, payload: dict[str, Any]) -> DescribeResult:
        """POST one chat request; the answer's text, finish reason and token counts, or an error
        result. Timeouts, connection errors, 408/429/5xx are retried with backoff up to
        max_retries times, except while the breaker is open: then the request waits for the
        endpoint instead, spending no retry (and raises EndpointOutageError if it stays down)."""
        watch = Stopwatch()
        retries = 0
        while True:
            async with self.slots:
                # after the slot: requests queued for a slot when the breaker opened wait too
                probe = await self.breaker.admit()
                result, retryable = await self._post(payload, watch)
            if not retryable:
                self.breaker.answered()
                return result
            self.breaker.failed(result, probe)
            if self.breaker.open:
                continue
            if retries == max(0, self.cfg.max_retries):
                result.latency_s = watch.elapsed()
                result.error = f"after {retries + 1} attempts: {result.error}"
                return result
            retries += 1
            await asyncio.sleep(backoff_s(retries))   # a waiting retry holds no slot

    async def _post(self, payload: dict[str, Any], watch: Stopwatch) -> tuple[DescribeResult, bool]:
        """One attempt: (result, whether its failure is one to retry)."""
        import httpx
        try:
            response = await self.client.post(self.url, json=payload)
        except httpx.TimeoutException as err:
            return DescribeResult.failed("timeout", f"no answer within {self.cfg.timeout_s}s: "
                                                    f"{type(err).__name__}: {err}"), True
        except httpx.TransportError as err:
            return DescribeResult.failed("connection", f"{type(err).__name__}: {err}"), True
        except httpx.HTTPError as err:  # e.g. DecodingError: the answer came, but garbled
            return DescribeResult.failed("bad_response", f"{type(err).__name__}: {err}", watch.elapsed()), False
        if response.status_code in _RETRYABLE_STATUS:
            return DescribeResult.failed(http_kind(response.status_code), response.text[:500]), True
        if response.status_code >= 400:
            return DescribeResult.failed(http_kind(response.status_code), response.text[:500], watch.elapsed()), False
        try:
            body = response.json()
        except ValueError as err:  # not JSON (json.JSONDecodeError, UnicodeDecodeError)
            return DescribeResult.failed("bad_response", f"status {response.status_code}, body is not JSON "
                                                         f"({err}): {response.text[:300]!r}", watch.elapsed()), False
        return _parse_completion(body, watch.elapsed()), False

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run(self.client.aclose())
            self.loop.close()
            self.loop = None


def _parse_completion(body: Any, latency_s: float) -> DescribeResult:
    try:
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        text = choice["message"]["content"]
        if text is None and choice.get("finish_reason") == "content_filter":
            return DescribeResult.failed("refused", f"the model refused this content (finish_reason content_filter): "
                                                    f"{str(choice['message'])[:300]}", latency_s)
        if not isinstance(text, str):
            raise TypeError(f"message content is {type(text).__name__}, not a string")
        return DescribeResult(text=text, finish_reason=choice.get("finish_reason"),
                              prompt_tokens=usage.get("prompt_tokens"),
                              output_tokens=usage.get("completion_tokens"), latency_s=latency_s)
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        return DescribeResult.failed("bad_response", f"unexpected response shape ({err!r}): {str(body)[:300]}",
                                     latency_s)
