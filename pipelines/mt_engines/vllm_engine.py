"""Translation with a chat LLM in-process on vLLM (e.g. Qwen/Qwen2.5-7B-Instruct): one AsyncLLM
per worker (describe's `StreamingLLM`: each request resolves its own future as it finishes),
prompts from the model's own chat template, answers cleaned of chatter."""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial
from typing import Any

from pipelines import languages
from pipelines.engines.base import EngineConfig, FatalEngineError, done_future, require
from pipelines.engines.vllm_engine import StreamingLLM
from pipelines.mt_engines import chat
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult, UnsupportedPairError


class ChatPairs:
    """Pair checks shared by the chat engines: an LLM translates between any languages it
    knows; the prompt needs each language's name, so the code must be in languages.LANGUAGES."""

    @staticmethod
    def pair_spec(cfg: EngineConfig, settings: MTSettings, source_lang: str, target_lang: str) -> str:
        chat.check_template(settings.prompt)
        for code in (source_lang, target_lang):
            if languages.primary(code) not in languages.LANGUAGES:
                raise UnsupportedPairError(f"no language name known for {code!r}")
        if source_lang == target_lang:
            raise UnsupportedPairError(f"source and target language are both {source_lang}")
        return chat.prompt_for_pair(settings.prompt, source_lang, target_lang)


def cleaned(request: TranslateRequest, result: TranslateResult) -> TranslateResult:
    """The answer without chatter (quotes, "Translation:", ...); shared with the openai engine."""
    if result.text is not None:
        result.text = chat.clean_answer(result.text, request.text, request.target_lang)
    return result


class VllmTranslator(ChatPairs):
    streaming = True

    def __init__(self, cfg: EngineConfig, settings: MTSettings):
        self.cfg, self.settings = cfg, settings
        self.llm: Any = None

    def setup(self) -> None:
        require("vllm", "vllm")
        transformers = require("transformers", "transformers")
        cfg = self.cfg
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except Exception as err:  # noqa: BLE001 - no tokenizer: nothing can run
            raise FatalEngineError(f"cannot load the tokenizer of {cfg.model!r}: {type(err).__name__}: {err}") from err
        if not getattr(self.tokenizer, "chat_template", None):
            raise FatalEngineError(f"{cfg.model!r} has no chat template: use an instruct/chat model, or "
                                   f"--engine transformers for a seq2seq MT model (NLLB, M2M100, Marian)")
        self.llm = StreamingLLM(cfg)
        self.llm.start()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def _prompt(self, request: TranslateRequest) -> str:
        content = chat.render(self.settings.prompt, request.text, request.source_lang, request.target_lang)
        # enable_thinking=False: reasoning models (Qwen3) answer directly; other templates ignore it
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False, enable_thinking=False)

    def in_flight_target(self) -> int:
        assert self.llm is not None, "setup() first"
        return 2 * self.llm.max_num_seqs

    def in_flight(self) -> int:
        return self.llm.in_flight() if self.llm is not None else 0

    def submit(self, requests: list[TranslateRequest]) -> list[Future]:
        """One future per request, in order; a prompt the template rejects fails alone."""
        assert self.llm is not None, "setup() first"
        futures = []
        for request in requests:
            try:
                futures.append(self.llm.submit(self._prompt(request), then=partial(cleaned, request)))
            except Exception as err:  # noqa: BLE001
                futures.append(done_future(TranslateResult.failed("invalid_request", f"{type(err).__name__}: {err}")))
        return futures

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        return [future.result() for future in self.submit(requests)]
