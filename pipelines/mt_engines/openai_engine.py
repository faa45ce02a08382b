"""Translation through any OpenAI-compatible chat endpoint (`vllm serve`, hosted APIs): the
same prompt and cleaning as the vllm engine; bounded concurrency, retries with backoff on
timeouts, connection errors, 429 and 5xx (the describe engine's `chat_completion`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipelines.engines.base import EngineConfig, FatalEngineError
from pipelines.engines.openai_engine import chat_completion, open_client
from pipelines.mt_engines import chat
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult
from pipelines.mt_engines.vllm_engine import ChatPairs


class OpenAITranslator(ChatPairs):
    def __init__(self, cfg: EngineConfig, settings: MTSettings):
        self.cfg, self.settings = cfg, settings
        self.client = self.pool = None

    def setup(self) -> None:
        if self.cfg.concurrency < 1:
            raise FatalEngineError(f"concurrency must be >= 1, got {self.cfg.concurrency}")
        self.client = open_client(self.cfg)
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="openai-translator")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        return list(self.pool.map(self._translate_one, requests))

    def _payload(self, request: TranslateRequest) -> dict:
        s = self.cfg.sampling
        content = chat.render(self.settings.prompt, request.text, request.source_lang, request.target_lang)
        payload = {"model": self.cfg.model, "messages": [{"role": "user", "content": content}],
                   "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed}
        if s.ignore_eos or s.repetition_penalty != 1.0:
            # vLLM extensions of the OpenAI schema; only sent when asked for
            payload.update(ignore_eos=s.ignore_eos, repetition_penalty=s.repetition_penalty)
        return payload

    def _translate_one(self, request: TranslateRequest) -> TranslateResult:
        result = chat_completion(self.client, self.cfg, self._payload(request))
        if result.text is not None:
            result.text = chat.clean_answer(result.text, request.text, request.target_lang)
        return result
