"""Translation with a chat LLM in-process on vLLM (e.g. Qwen/Qwen2.5-7B-Instruct): one AsyncLLM
per worker (describe's `StreamingLLM`: each request returns as it finishes, several batches in
flight at once), prompts from the model's own chat template, answers cleaned of chatter."""

from __future__ import annotations

from typing import Any

from pipelines import languages
from pipelines.engines.base import EngineConfig, FatalEngineError, require
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


class VllmTranslator(ChatPairs):
    concurrent_calls = True

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

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        results: list[TranslateResult | None] = [None] * len(requests)
        prompts, positions = [], []
        for i, request in enumerate(requests):
            try:
                prompts.append(self._prompt(request))
                positions.append(i)
            except Exception as err:  # noqa: BLE001 - a prompt the template rejects fails alone
                results[i] = TranslateResult.failed("invalid_request", f"{type(err).__name__}: {err}")
        for pos, result in zip(positions, self.llm.generate_all(prompts) if prompts else []):
            request = requests[pos]
            if result.text is not None:
                result.text = chat.clean_answer(result.text, request.text, request.target_lang)
            results[pos] = result
        return [r for r in results if r is not None]
