"""Translation through any OpenAI-compatible chat endpoint (`vllm serve`, hosted APIs): the
same prompt and cleaning as the vllm engine; `concurrency` requests in flight per worker across
batches, retries with backoff on timeouts, connection errors, 429 and 5xx (describe's
`ChatClient`)."""

from __future__ import annotations

from pipelines.engines.base import EngineConfig
from pipelines.engines.openai_engine import ChatClient, chat_payload
from pipelines.mt_engines import chat
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult
from pipelines.mt_engines.vllm_engine import ChatPairs


class OpenAITranslator(ChatPairs):
    concurrent_calls = True

    def __init__(self, cfg: EngineConfig, settings: MTSettings):
        self.cfg, self.settings = cfg, settings
        self.chat: ChatClient | None = None

    def setup(self) -> None:
        self.chat = ChatClient(self.cfg)
        self.chat.start()

    def close(self) -> None:
        if self.chat is not None:
            self.chat.close()
            self.chat = None

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        assert self.chat is not None, "setup() first"
        payloads = [chat_payload(self.cfg, chat.render(self.settings.prompt, r.text, r.source_lang, r.target_lang))
                    for r in requests]
        results = self.chat.complete_all(payloads)
        for request, result in zip(requests, results):
            if result.text is not None:
                result.text = chat.clean_answer(result.text, request.text, request.target_lang)
        return results
