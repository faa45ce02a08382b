"""Any OpenAI-compatible chat endpoint (e.g. `vllm serve`): `concurrency` requests in flight per
worker across batches (asyncio, no per-batch barrier), retries with exponential backoff on
timeouts, connection errors, 429 and 5xx; other 4xx fail the request.

Media travel as base64 JPEG data URLs; a video as its sampled frames (several images), which
every multimodal chat server accepts. `open_client` (endpoint check) and `ChatClient` (the
requests) are shared with the translate stage's openai engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, EngineLoop, FatalEngineError,
                                    Stopwatch, done_future, frames_of)

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
# Backoff before retry n (n >= 1): BACKOFF_BASE_S * 2**(n-1), capped at BACKOFF_MAX_S, times a
# jitter in [0.5, 1.5). Module constants so tests can shorten them.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


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

def open_client(cfg: EngineConfig) -> Any:
    """An httpx client for cfg.base_url, once the endpoint is known to serve cfg.model (else
    FatalEngineError: nothing could succeed). Used by the describe and translate engines."""
    import httpx
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=max(1, cfg.concurrency))
    client = httpx.Client(headers=headers, timeout=cfg.timeout_s, limits=limits)
    base_url = cfg.base_url.rstrip("/")
    try:
        listed = client.get(f"{base_url}/models")
        listed.raise_for_status()
        served = [m.get("id") for m in listed.json().get("data", [])]
    except Exception as err:  # noqa: BLE001 - unreachable endpoint: nothing can succeed
        client.close()
        raise FatalEngineError(f"endpoint {base_url} is not usable: {type(err).__name__}: {err}") from err
    if cfg.model not in served:
        client.close()
        raise FatalEngineError(f"endpoint {base_url} does not serve model {cfg.model!r} "
                               f"(it serves: {', '.join(map(str, served)) or 'nothing'})")
    return client


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
        open_client(self.cfg).close()   # an endpoint that is down or lacks the model fails here
        self.loop = EngineLoop()
        self.loop.run(self._open())

    async def _open(self) -> None:
        import httpx
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        self.client = httpx.AsyncClient(headers=headers, timeout=self.cfg.timeout_s, limits=limits)
        self.slots = asyncio.Semaphore(self.cfg.concurrency)

    def submit(self, payload: dict[str, Any], then: Callable[[DescribeResult], DescribeResult] | None = None) -> Future:
        """Start one request; the future resolves as soon as it is answered (after retries), after
        `then` (per-request post-processing) ran on its result."""
        assert self.loop is not None, "start() first"

        async def one() -> DescribeResult:
            result = await self.complete(payload)
            return then(result) if then else result
        return self.loop.submit(one())

    async def complete(self, payload: dict[str, Any]) -> DescribeResult:
        """POST one chat request, retrying timeouts, connection errors, 408/429/5xx with backoff;
        the answer's text, finish reason and token counts, or an error result (never raises)."""
        import httpx
        cfg = self.cfg
        watch = Stopwatch()
        attempts = max(0, cfg.max_retries) + 1
        last: DescribeResult | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff_s(attempt))   # a waiting retry holds no slot
            try:
                async with self.slots:
                    response = await self.client.post(self.url, json=payload)
            except httpx.TimeoutException as err:
                last = DescribeResult.failed("timeout", f"no answer within {cfg.timeout_s}s: {type(err).__name__}: {err}")
                continue
            except httpx.TransportError as err:
                last = DescribeResult.failed("connection", f"{type(err).__name__}: {err}")
                continue
            except httpx.HTTPError as err:  # e.g. DecodingError: the answer came, but garbled
                return DescribeResult.failed("bad_response", f"{type(err).__name__}: {err}", watch.elapsed())
            if response.status_code in _RETRYABLE_STATUS:
                last = DescribeResult.failed(f"http_{response.status_code}", response.text[:500])
                continue
            if response.status_code >= 400:
                return DescribeResult.failed(f"http_{response.status_code}", response.text[:500], watch.elapsed())
            try:
                body = response.json()
            except ValueError as err:  # not JSON (json.JSONDecodeError, UnicodeDecodeError)
                return DescribeResult.failed("bad_response", f"status {response.status_code}, body is not JSON "
                                                             f"({err}): {response.text[:300]!r}", watch.elapsed())
            return _parse_completion(body, watch.elapsed())
        assert last is not None
        last.latency_s = watch.elapsed()
        last.error = f"after {attempts} attempts: {last.error}"
        return last

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
        if not isinstance(text, str):
            raise TypeError(f"message content is {type(text).__name__}, not a string")
        return DescribeResult(text=text, finish_reason=choice.get("finish_reason"),
                              prompt_tokens=usage.get("prompt_tokens"),
                              output_tokens=usage.get("completion_tokens"), latency_s=latency_s)
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        return DescribeResult.failed("bad_response", f"unexpected response shape ({err!r}): {str(body)[:300]}",
                                     latency_s)
