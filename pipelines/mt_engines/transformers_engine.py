"""Translation with a transformers seq2seq MT model: NLLB-200, M2M100 or Marian (opus-mt).

Each family names languages its own way; users give BCP-47 codes and `LanguageCodes` maps them:
- NLLB-200 (`facebook/nllb-200-distilled-600M`, ...): FLORES-200 codes (`deu_Latn`); the
  tokenizer's `src_lang` marks the source, the target code is forced as the first token.
- M2M100 (`facebook/m2m100_418M`, ...): ISO 639-1 (`__de__` tokens), used the same way.
- Marian (`Helsinki-NLP/opus-mt-en-de`, ...): one model per pair (checked against the
  tokenizer's `source_lang`/`target_lang` when it records them); multi-target models take a
  `>>deu<<` / `>>de<<` token before the source text.
The family comes from an explicit table of model types and the tokenizer's own language
tokens, never from the model's name. Batches are padded and generated together; when a whole
batch fails, it is retried one request at a time so that only the bad request fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pipelines import languages
from pipelines.engines.base import EngineConfig, FatalEngineError, Stopwatch, require
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult, UnsupportedPairError

SUPPORTED = "NLLB-200, M2M100 or Marian (opus-mt) models"
# model_type (config.json) -> family; nllb checkpoints say m2m_100 and differ by tokenizer
_MODEL_TYPES = {"marian": "marian", "m2m_100": "m2m100-or-nllb", "nllb-moe": "nllb"}


@dataclass
class LanguageCodes:
    """How one model family names languages, and where the codes go."""
    family: str                       # nllb | m2m100 | marian
    vocab: frozenset[str]
    source_lang: str | None = None    # marian: the pair a single-pair model was trained on
    target_lang: str | None = None

    @classmethod
    def of(cls, model_type: str | None, tokenizer: Any) -> "LanguageCodes":
        kind = _MODEL_TYPES.get(model_type or "")
        vocab = frozenset(tokenizer.get_vocab())
        if kind == "marian":
            return cls("marian", vocab, getattr(tokenizer, "source_lang", None), getattr(tokenizer, "target_lang", None))
        if kind in ("nllb", "m2m100-or-nllb") and "eng_Latn" in vocab:
            return cls("nllb", vocab)
        if kind == "m2m100-or-nllb" and "__en__" in vocab:
            return cls("m2m100", vocab)
        raise UnsupportedPairError(f"model type {model_type!r} with tokenizer {type(tokenizer).__name__}: no known "
                                   f"language codes; the transformers engine runs {SUPPORTED}")

    def source_code(self, lang: str) -> str | None:
        if self.family == "nllb":
            code = languages.flores_code(lang)
            return code if code in self.vocab else None
        if self.family == "m2m100":
            code = languages.primary(lang)
            return code if f"__{code}__" in self.vocab else None
        known = self.source_lang
        return lang if known is None or _same_language(known, lang) else None

    def target_token(self, lang: str) -> str | None:
        """nllb/m2m100: the token forced first; marian: the token put before the text (or "")."""
        if self.family == "nllb":
            return self.source_code(lang)
        if self.family == "m2m100":
            code = self.source_code(lang)
            return f"__{code}__" if code else None
        prefixed = [t for t in self.vocab if t.startswith(">>") and t.endswith("<<")]
        if prefixed:  # a multi-target model: its language tokens list what it can write
            flores = languages.flores_code(lang)
            for candidate in (lang, languages.primary(lang), flores, flores[:3]):
                if f">>{candidate}<<" in prefixed:
                    return f">>{candidate}<<"
            return None
        return "" if self.target_lang is None or _same_language(self.target_lang, lang) else None

    def check(self, source_lang: str, target_lang: str, model: str) -> None:
        problems = []
        if self.source_code(source_lang) is None:
            problems.append(f"source {source_lang}" + (f" (it translates from {self.source_lang})"
                                                       if self.source_lang else ""))
        if self.target_token(target_lang) is None:
            problems.append(f"target {target_lang}" + (f" (it translates into {self.target_lang})"
                                                       if self.target_lang else ""))
        if problems:
            raise UnsupportedPairError(f"{model} ({self.family}) does not support {' and '.join(problems)}")

    def spec(self, source_lang: str, target_lang: str) -> str:
        target = self.target_token(target_lang) or f"{target_lang} (one-pair model)"
        return f"{self.family}: {self.source_code(source_lang)} -> {target}"


def _same_language(model_code: str, lang: str) -> bool:
    """Marian tokenizers record "en" or "eng": compare with the 2- and 3-letter forms of lang."""
    code = model_code.split("_")[0].split("-")[0].lower()
    return code in (languages.primary(lang), languages.flores_code(lang)[:3])


def _load_codes(model: str, revision: str | None, trust_remote_code: bool) -> tuple[LanguageCodes, Any]:
    transformers = require("transformers", "transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, revision=revision,
                                                               trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - no config/tokenizer: nothing can run
        raise FatalEngineError(f"transformers could not load {model!r}: {type(err).__name__}: {err}") from err
    return LanguageCodes.of(getattr(config, "model_type", None), tokenizer), tokenizer


@lru_cache(maxsize=8)
def _codes_for_checks(model: str, revision: str | None, trust_remote_code: bool) -> LanguageCodes:
    """The driver checks every pair (targets, back-translation) with one tokenizer load."""
    return _load_codes(model, revision, trust_remote_code)[0]


class Seq2SeqTranslator:
    def __init__(self, cfg: EngineConfig, settings: MTSettings):
        self.cfg = cfg
        self.model = None

    @staticmethod
    def pair_spec(cfg: EngineConfig, settings: MTSettings, source_lang: str, target_lang: str) -> str:
        # config and tokenizer only: cheap, and the tokenizer lists the languages
        codes = _codes_for_checks(cfg.model, cfg.revision, cfg.trust_remote_code)
        codes.check(source_lang, target_lang, cfg.model)
        return codes.spec(source_lang, target_lang)

    def setup(self) -> None:
        torch = require("torch", "transformers")
        transformers = require("transformers", "transformers")
        cfg = self.cfg
        self.codes, self.tokenizer = _load_codes(cfg.model, cfg.revision, cfg.trust_remote_code)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
                cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype,
            ).to(device).eval()
        except Exception as err:  # noqa: BLE001 - a model that cannot load is fatal
            raise FatalEngineError(f"transformers could not load {cfg.model!r}: {type(err).__name__}: {err}") from err
        self.torch, self.device = torch, device
        # longest input the model takes; tokenizers of some models say "infinite" (a huge int)
        limits = [x for x in (getattr(self.tokenizer, "model_max_length", None),
                              getattr(self.model.config, "max_position_embeddings", None))
                  if isinstance(x, int) and 0 < x < 1_000_000]
        self.max_input_tokens = min(limits) if limits else None

    def close(self) -> None:
        self.model = None

    def translate(self, requests: list[TranslateRequest]) -> list[TranslateResult]:
        results: list[TranslateResult | None] = [None] * len(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.source_lang, request.target_lang), []).append(i)
        for (source_lang, target_lang), positions in groups.items():
            texts = [requests[i].text for i in positions]
            for pos, result in zip(positions, self._generate(texts, source_lang, target_lang)):
                results[pos] = result
        return [r for r in results if r is not None]

    def _generate(self, texts: list[str], source_lang: str, target_lang: str) -> list[TranslateResult]:
        watch = Stopwatch()
        try:
            inputs, kwargs = self._inputs(texts, source_lang, target_lang)
            with self.torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
        except Exception as err:  # noqa: BLE001
            if isinstance(err, MemoryError):
                raise FatalEngineError(f"the transformers engine failed: {type(err).__name__}: {err}") from err
            if len(texts) == 1:
                return [TranslateResult.failed("invalid_request", f"{type(err).__name__}: {err}", watch.elapsed())]
            return [r for text in texts for r in self._generate([text], source_lang, target_lang)]
        share = watch.elapsed() / len(texts)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [self._result(seq, int(n), share) for seq, n in zip(out, prompt_tokens)]

    def _inputs(self, texts: list[str], source_lang: str, target_lang: str) -> tuple[Any, dict]:
        s = self.cfg.sampling
        target = self.codes.target_token(target_lang)
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, "do_sample": s.temperature > 0,
                                  "repetition_penalty": s.repetition_penalty}
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
            self.torch.manual_seed(s.seed)
        if s.ignore_eos:
            kwargs["min_new_tokens"] = s.max_tokens
        if self.codes.family in ("nllb", "m2m100"):
            self.tokenizer.src_lang = self.codes.source_code(source_lang)
            kwargs["forced_bos_token_id"] = self.tokenizer.convert_tokens_to_ids(target)
        elif target:
            texts = [f"{target} {t}" for t in texts]
        kwargs.update(self.cfg.engine_kwargs)  # e.g. num_beams=4
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
        longest = int(inputs["attention_mask"].sum(dim=1).max())
        if self.max_input_tokens and longest > self.max_input_tokens:
            raise ValueError(f"input has {longest} tokens; the model takes at most {self.max_input_tokens}")
        return inputs.to(self.device), kwargs

    def _result(self, sequence: Any, prompt_tokens: int, latency_s: float) -> TranslateResult:
        tokens = [t for t in sequence.tolist()[1:] if t != self.tokenizer.pad_token_id]  # [0]: decoder start
        # by count, not by a final EOS: Marian configs force an EOS at the token limit
        finish = "length" if len(tokens) >= self.cfg.sampling.max_tokens else "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return TranslateResult(text=text, prompt_tokens=prompt_tokens, output_tokens=len(tokens),
                               finish_reason=finish, latency_s=latency_s)
