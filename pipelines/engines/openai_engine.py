"""Any OpenAI-compatible chat endpoint (e.g. `vllm serve`): bounded concurrency, retries with
exponential backoff on timeouts, connection errors, 429 and 5xx; other 4xx fail the request.

Media travel as base64 JPEG data URLs; a video as its sampled frames (several images), which
every multimodal chat server accepts. `open_client` and `chat_completion` (endpoint check, one
request with retries) are shared with the translate stage's openai engine.
"""

from __future__ import annotations

import base64
import io
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipelines.engines.base import (DescribeRequest, DescribeResult, EngineConfig, FatalEngineError,
                                    Stopwatch, frames_of)

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


class OpenAIDescriber:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")

    def setup(self) -> None:
        if self.cfg.concurrency < 1:
            raise FatalEngineError(f"concurrency must be >= 1, got {self.cfg.concurrency}")
        self.client = open_client(self.cfg)
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="openai-describer")

    def close(self) -> None:
        """Release the worker threads and connections (optional: a finished process does it too)."""
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None

    def describe(self, requests: list[DescribeRequest]) -> list[DescribeResult]:
        return list(self.pool.map(self._describe_one, requests))

    def _payload(self, request: DescribeRequest) -> dict[str, Any]:
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": _data_url(frame)}}
                             for frame in frames_of(request)]
        parts.append({"type": "text", "text": request.prompt})
        s = self.cfg.sampling
        payload = {"model": self.cfg.model, "messages": [{"role": "user", "content": parts}],
                   "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed}
        if s.ignore_eos or s.repetition_penalty != 1.0:
            # vLLM extensions of the OpenAI schema; only sent when asked for
            payload.update(ignore_eos=s.ignore_eos, repetition_penalty=s.repetition_penalty)
        return payload

    def _describe_one(self, request: DescribeRequest) -> DescribeResult:
        watch = Stopwatch()
        try:
            payload = self._payload(request)
        except Exception as err:  # noqa: BLE001 - one unencodable request must not fail the batch
            return DescribeResult.failed("invalid_request", f"cannot encode the media: {type(err).__name__}: {err}",
                                         watch.elapsed())
        return chat_completion(self.client, self.cfg, payload)


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


def chat_completion(client: Any, cfg: EngineConfig, payload: dict[str, Any]) -> DescribeResult:
    """POST one chat request, retrying timeouts, connection errors, 408/429/5xx with backoff;
    the answer's text, finish reason and token counts, or an error result (never raises)."""
    import httpx
    url = f"{cfg.base_url.rstrip('/')}/chat/completions"
    watch = Stopwatch()
    attempts = max(0, cfg.max_retries) + 1
    last: DescribeResult | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s(attempt))
        try:
            response = client.post(url, json=payload)
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
