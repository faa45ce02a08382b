"""Translation through any OpenAI-compatible chat endpoint (`vllm serve`, hosted APIs): the
same prompt and cleaning as the vllm engine; `concurrency` requests in flight per worker, each
resolving its own future, retries with backoff on timeouts, connection errors, 429 and 5xx (describe's
`ChatClient`)."""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial

from pipelines.engines.base import EngineConfig
from pipelines.engines.openai_engine import EndpointEngine, chat_payload
from pipelines.mt_engines import chat
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult
from pipelines.mt_engines.vllm_engine import ChatPairs, cleaned


class OpenAITranslator(ChatPairs, EndpointEngine):
    def __init__(self, cfg: EngineConfig, settings: MTSettings):
        super().__init__(cfg)
        self.settings = settings

    def submit(self, requests: list[TranslateRequest]) -> list[Future]:
        assert self.chat is not None, "setup() first"
        return [self.chat.submit(chat_payload(self.cfg, chat.render(self.settings.prompt, r.text, r.source_lang,
                                                                    r.target_lang)), then=partial(cleaned, r))
                for r in requests]

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        return [future.result() for future in self.submit(requests)]
