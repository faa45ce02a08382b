"""Quality signals of one machine translation, computed from strings alone (no model).

Source side (`normalize_source`): control characters, lossy-decoding marks and mixed scripts
are flagged, and the text the engine sees is cleaned (controls removed, whitespace collapsed).
Target side (`translation_flags`): empty output, a copy of the source, a length ratio far from
what the language pair makes likely, letters in a script the target language does not use,
an answer that is not a translation (a refusal, an explanation, several alternatives), and an
answer cut off by the token limit. Flags are strings in the row's `quality_flags`, so the
trainer can filter or weight by them; `length_ratio` and `roundtrip_chrf` are stored as numbers
so other thresholds can be applied later.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from pipelines import languages

# Bump when cleaning or any flag rule changes: it is part of the translate fingerprint, so new
# rules never mix with rows written under old ones.
QUALITY_VERSION = "1"

# Flag names (the vocabulary of CAPTIONS.quality_flags for origin = mt)
EMPTY = "empty"
COPY_OF_SOURCE = "copy_of_source"
LENGTH_RATIO = "length_ratio"
WRONG_SCRIPT = "wrong_script"
NOT_A_TRANSLATION = "not_a_translation"
TRUNCATED = "truncated"                       # the engine stopped at its token limit
SOURCE_CONTROL_CHARS = "source_control_chars"
SOURCE_INVALID_UTF8 = "source_invalid_utf8"   # U+FFFD: the mark of a lossy UTF-8 decode upstream
SOURCE_MIXED_SCRIPTS = "source_mixed_scripts"
BACKTRANSLATION_FAILED = "backtranslation_failed"

LENGTH_RATIO_TOLERANCE = 3.0   # flag ratios more than 3x off the pair's expected ratio
MIN_CHARS_FOR_RATIO = 4        # "a" -> "ein": ratios of tiny strings mean nothing

_WHITESPACE_RE = re.compile(r"\s+")


def normalize_source(text: str | None) -> tuple[str, list[str]]:
    """The text the engine sees (also the de-duplication key) and the source's flags."""
    if text is None:
        return "", []
    flags = []
    if any(_is_control(c) for c in text):
        flags.append(SOURCE_CONTROL_CHARS)
    if "\ufffd" in text:
        flags.append(SOURCE_INVALID_UTF8)
    kept = "".join(" " if _is_control(c) or c == "\ufffd" else c for c in text
                   if unicodedata.category(c) != "Cf")   # zero-width, BOM, bidi marks: invisible
    clean = _WHITESPACE_RE.sub(" ", kept).strip()
    if len(languages.script_counts(clean)) > 1:
        flags.append(SOURCE_MIXED_SCRIPTS)
    return clean, flags


def _is_control(char: str) -> bool:
    # tab/newline/CR are whitespace (collapsed, not flagged); other C0/C1 controls are not text
    return unicodedata.category(char) == "Cc" and char not in "\t\n\r"


def length_ratio(source: str, translation: str) -> float | None:
    return len(translation) / len(source) if source else None


def translation_flags(source: str, translation: str, source_lang: str, target_lang: str,
                      finish_reason: str | None = None) -> list[str]:
    """Flags of one translation of `source` (both already cleaned)."""
    if not translation.strip():
        return [EMPTY]
    flags = []
    if _comparable(translation) and _comparable(translation) == _comparable(source):
        flags.append(COPY_OF_SOURCE)
    if _length_out_of_bounds(source, translation, source_lang, target_lang):
        flags.append(LENGTH_RATIO)
    if wrong_script(translation, target_lang, source):
        flags.append(WRONG_SCRIPT)
    if not_a_translation(source, translation):
        flags.append(NOT_A_TRANSLATION)
    if finish_reason == "length":
        flags.append(TRUNCATED)
    return flags


def _comparable(text: str) -> str:
    """Letters and digits only, case-folded: "A dog." and "a dog" compare equal."""
    return "".join(c for c in text.casefold() if c.isalnum())


def _length_out_of_bounds(source: str, translation: str, source_lang: str, target_lang: str) -> bool:
    if len(source) < MIN_CHARS_FOR_RATIO and len(translation) < MIN_CHARS_FOR_RATIO * LENGTH_RATIO_TOLERANCE:
        return False
    expected = languages.language(target_lang).density / languages.language(source_lang).density
    ratio = len(translation) / max(1, len(source))
    return not expected / LENGTH_RATIO_TOLERANCE <= ratio <= expected * LENGTH_RATIO_TOLERANCE


def wrong_script(translation: str, target_lang: str, source: str = "") -> bool:
    """True when the letters are mostly outside the target's scripts, or include a script that
    neither the target, Latin (names, acronyms) nor the source (copied names) explains."""
    counts = languages.script_counts(translation)
    total = sum(counts.values())
    if not total:
        return False
    expected = languages.expected_scripts(target_lang)
    if sum(counts[s] for s in expected) / total < 0.5:
        return True
    tolerated = expected | {"Latin"} | set(languages.script_counts(source))
    return any(script not in tolerated for script in counts)


# Openings of answers that talk about the text instead of translating it (LLMs answer such
# meta-talk in English whatever the target; a caption never starts like this).
_META_OPENINGS = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry\b|i can ?not\b|i can't\b|i'?m unable|i am unable|as an ai\b|unfortunately\b"
    r"|please provide\b|the (?:\w+ )?(?:text|sentence|caption|phrase|source) (?:means|describes|is|says|translates"
    r"|appears|seems|already)\b|this (?:\w+ )?(?:text|sentence|caption|phrase) (?:means|describes|is|says|translates"
    r"|appears|seems)\b|it means\b|translation (?:is )?not possible)", re.IGNORECASE)


def not_a_translation(source: str, translation: str) -> bool:
    if _META_OPENINGS.search(translation) or "as an ai language model" in translation.casefold():
        return True
    # several lines for a one-line caption: alternatives, or a translation plus commentary
    if "\n" not in source and len([line for line in translation.splitlines() if line.strip()]) > 1:
        return True
    # the answer quotes the whole source and adds to it: "'A dog runs' means 'Ein Hund läuft'"
    return len(source) >= 12 and source.casefold() in translation.casefold() and len(translation) > 1.2 * len(source)


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence-level chrF (sacrebleu's default chrF: character 6-grams, beta 2), 0..100."""
    return float(_chrf_metric().sentence_score(hypothesis, [reference]).score)


@lru_cache(maxsize=1)
def _chrf_metric():
    from sacrebleu.metrics import CHRF   # optional dependency: imported when back-translating
    return CHRF()
