"""Any OpenAI-compatible chat endpoint (e.g. `vllm serve`): bounded concurrency, retries with
exponential backoff on timeouts, connection errors, 429 and 5xx; other 4xx fail the request.

Media travel as base64 JPEG data URLs; a video as its sampled frames (several images), which
every multimodal chat server accepts.
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
        import httpx
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency)
        self.client = httpx.Client(headers=headers, timeout=self.cfg.timeout_s, limits=limits)
        try:
            listed = self.client.get(f"{self.base_url}/models")
            listed.raise_for_status()
            served = [m.get("id") for m in listed.json().get("data", [])]
        except Exception as err:  # noqa: BLE001 - unreachable endpoint: nothing can succeed
            raise FatalEngineError(f"endpoint {self.base_url} is not usable: {type(err).__name__}: {err}") from err
        if self.cfg.model not in served:
            raise FatalEngineError(f"endpoint {self.base_url} does not serve model {self.cfg.model!r} "
                                   f"(it serves: {', '.join(map(str, served)) or 'nothing'})")
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)

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
        import httpx
        payload = self._payload(request)
        watch = Stopwatch()
        last: DescribeResult | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                response = self.client.post(f"{self.base_url}/chat/completions", json=payload)
            except httpx.TimeoutException as err:
                last = DescribeResult.failed("timeout", f"no answer within {self.cfg.timeout_s}s: {err}")
                continue
            except httpx.TransportError as err:
                last = DescribeResult.failed("connection", f"{type(err).__name__}: {err}")
                continue
            if response.status_code in _RETRYABLE_STATUS:
                last = DescribeResult.failed(f"http_{response.status_code}", response.text[:500])
                continue
            if response.status_code >= 400:
                return DescribeResult.failed(f"http_{response.status_code}", response.text[:500], watch.elapsed())
            return self._result(response.json(), watch.elapsed())
        assert last is not None
        last.latency_s = watch.elapsed()
        last.error = f"after {self.cfg.max_retries + 1} attempts: {last.error}"
        return last

    @staticmethod
    def _result(body: dict, latency_s: float) -> DescribeResult:
        try:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return DescribeResult(text=choice["message"]["content"], finish_reason=choice.get("finish_reason"),
                                  prompt_tokens=usage.get("prompt_tokens"),
                                  output_tokens=usage.get("completion_tokens"), latency_s=latency_s)
        except (KeyError, IndexError, TypeError) as err:
            return DescribeResult.failed("bad_response", f"unexpected response shape ({err!r}): {str(body)[:300]}",
                                         latency_s)
