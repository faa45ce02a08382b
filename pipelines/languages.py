"""Languages for the translate stage: BCP-47 codes, the scripts each language is written in,
and the codes that MT models use for them.

Users name languages with ISO 639-1 / BCP-47 codes (`de`, `zh-Hans`, `pt-BR`). A code is
normalised (`PT_br` -> `pt-BR`) and must name a language of `LANGUAGES`: an unknown code is an
error before any work starts, never a guess. Engines map the code to their own scheme here
(NLLB/FLORES-200 `deu_Latn`, M2M100 `de`, Marian `>>deu<<`), so users never type those.

Scripts come from Unicode character names (`LATIN SMALL LETTER A` -> Latin), counted over
letters only; they drive the wrong-script quality check.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache


class UnknownLanguageError(ValueError):
    """A language code that is malformed or names no language this project knows."""


@dataclass(frozen=True)
class Language:
    name: str                       # English name, used in LLM prompts
    scripts: frozenset[str]         # scripts a caption in this language is written in
    flores: str                     # NLLB-200 / FLORES-200 code (default script variant)
    density: float = 1.0            # characters per unit of meaning relative to English (length checks)


def _lang(name: str, scripts: str, flores: str, density: float = 1.0) -> Language:
    return Language(name, frozenset(scripts.split("+")), flores, density)


# ISO 639-1 primary subtag -> language. Densities: CJK scripts carry several English characters'
# worth of meaning per character; the rest are near English. Rough on purpose: the length check
# only flags ratios several times off.
LANGUAGES: dict[str, Language] = {
    "af": _lang("Afrikaans", "Latin", "afr_Latn"),
    "am": _lang("Amharic", "Ethiopic", "amh_Ethi"),
    "ar": _lang("Arabic", "Arabic", "arb_Arab"),
    "az": _lang("Azerbaijani", "Latin", "azj_Latn"),
    "be": _lang("Belarusian", "Cyrillic", "bel_Cyrl"),
    "bg": _lang("Bulgarian", "Cyrillic", "bul_Cyrl"),
    "bn": _lang("Bengali", "Bengali", "ben_Beng"),
    "bs": _lang("Bosnian", "Latin", "bos_Latn"),
    "ca": _lang("Catalan", "Latin", "cat_Latn"),
    "cs": _lang("Czech", "Latin", "ces_Latn"),
    "cy": _lang("Welsh", "Latin", "cym_Latn"),
    "da": _lang("Danish", "Latin", "dan_Latn"),
    "de": _lang("German", "Latin", "deu_Latn"),
    "el": _lang("Greek", "Greek", "ell_Grek"),
    "en": _lang("English", "Latin", "eng_Latn"),
    "eo": _lang("Esperanto", "Latin", "epo_Latn"),
    "es": _lang("Spanish", "Latin", "spa_Latn"),
    "et": _lang("Estonian", "Latin", "est_Latn"),
    "eu": _lang("Basque", "Latin", "eus_Latn"),
    "fa": _lang("Persian", "Arabic", "pes_Arab"),
    "fi": _lang("Finnish", "Latin", "fin_Latn"),
    "fr": _lang("French", "Latin", "fra_Latn"),
    "ga": _lang("Irish", "Latin", "gle_Latn"),
    "gl": _lang("Galician", "Latin", "glg_Latn"),
    "gu": _lang("Gujarati", "Gujarati", "guj_Gujr"),
    "he": _lang("Hebrew", "Hebrew", "heb_Hebr"),
    "hi": _lang("Hindi", "Devanagari", "hin_Deva"),
    "hr": _lang("Croatian", "Latin", "hrv_Latn"),
    "hu": _lang("Hungarian", "Latin", "hun_Latn"),
    "hy": _lang("Armenian", "Armenian", "hye_Armn"),
    "id": _lang("Indonesian", "Latin", "ind_Latn"),
    "is": _lang("Icelandic", "Latin", "isl_Latn"),
    "it": _lang("Italian", "Latin", "ita_Latn"),
    "ja": _lang("Japanese", "Han+Hiragana+Katakana", "jpn_Jpan", 0.45),
    "ka": _lang("Georgian", "Georgian", "kat_Geor"),
    "kk": _lang("Kazakh", "Cyrillic", "kaz_Cyrl"),
    "km": _lang("Khmer", "Khmer", "khm_Khmr"),
    "kn": _lang("Kannada", "Kannada", "kan_Knda"),
    "ko": _lang("Korean", "Hangul+Han", "kor_Hang", 0.5),
    "lo": _lang("Lao", "Lao", "lao_Laoo"),
    "lt": _lang("Lithuanian", "Latin", "lit_Latn"),
    "lv": _lang("Latvian", "Latin", "lvs_Latn"),
    "mk": _lang("Macedonian", "Cyrillic", "mkd_Cyrl"),
    "ml": _lang("Malayalam", "Malayalam", "mal_Mlym"),
    "mn": _lang("Mongolian", "Cyrillic", "khk_Cyrl"),
    "mr": _lang("Marathi", "Devanagari", "mar_Deva"),
    "ms": _lang("Malay", "Latin", "zsm_Latn"),
    "my": _lang("Burmese", "Myanmar", "mya_Mymr"),
    "nb": _lang("Norwegian Bokmål", "Latin", "nob_Latn"),
    "ne": _lang("Nepali", "Devanagari", "npi_Deva"),
    "nl": _lang("Dutch", "Latin", "nld_Latn"),
    "nn": _lang("Norwegian Nynorsk", "Latin", "nno_Latn"),
    "no": _lang("Norwegian", "Latin", "nob_Latn"),
    "pa": _lang("Punjabi", "Gurmukhi", "pan_Guru"),
    "pl": _lang("Polish", "Latin", "pol_Latn"),
    "pt": _lang("Portuguese", "Latin", "por_Latn"),
    "ro": _lang("Romanian", "Latin", "ron_Latn"),
    "ru": _lang("Russian", "Cyrillic", "rus_Cyrl"),
    "si": _lang("Sinhala", "Sinhala", "sin_Sinh"),
    "sk": _lang("Slovak", "Latin", "slk_Latn"),
    "sl": _lang("Slovenian", "Latin", "slv_Latn"),
    "sq": _lang("Albanian", "Latin", "als_Latn"),
    "sr": _lang("Serbian", "Cyrillic+Latin", "srp_Cyrl"),
    "sv": _lang("Swedish", "Latin", "swe_Latn"),
    "sw": _lang("Swahili", "Latin", "swh_Latn"),
    "ta": _lang("Tamil", "Tamil", "tam_Taml"),
    "te": _lang("Telugu", "Telugu", "tel_Telu"),
    "th": _lang("Thai", "Thai", "tha_Thai"),
    "tl": _lang("Tagalog", "Latin", "tgl_Latn"),
    "tr": _lang("Turkish", "Latin", "tur_Latn"),
    "uk": _lang("Ukrainian", "Cyrillic", "ukr_Cyrl"),
    "ur": _lang("Urdu", "Arabic", "urd_Arab"),
    "uz": _lang("Uzbek", "Latin", "uzn_Latn"),
    "vi": _lang("Vietnamese", "Latin", "vie_Latn"),
    "zh": _lang("Chinese", "Han", "zho_Hans", 0.3),
}

# ISO 15924 script subtags -> the script names used here (`zh-Hant`, `sr-Latn`, ...).
SCRIPT_SUBTAGS = {
    "Latn": "Latin", "Cyrl": "Cyrillic", "Grek": "Greek", "Arab": "Arabic", "Hebr": "Hebrew",
    "Hans": "Han", "Hant": "Han", "Hani": "Han", "Jpan": "Han+Hiragana+Katakana", "Kore": "Hangul+Han",
    "Hang": "Hangul", "Deva": "Devanagari", "Thai": "Thai", "Beng": "Bengali", "Taml": "Tamil",
}  # fmt: skip

# Traditional Chinese by region when no script subtag says so.
_TRADITIONAL_REGIONS = {"TW", "HK", "MO"}

_CODE_RE = re.compile(r"^(?P<lang>[a-z]{2})(?:-(?P<script>[A-Z][a-z]{3}))?(?:-(?P<region>[A-Z]{2}|\d{3}))?$")


@lru_cache(maxsize=4096)   # called once per source row
def normalize(code: str) -> str:
    """Canonical BCP-47 form of a language code: `PT_br` -> `pt-BR`, `zh-hans` -> `zh-Hans`.

    Raises UnknownLanguageError for a malformed code or a language not in LANGUAGES."""
    raw = (code or "").strip().replace("_", "-")
    parts = raw.split("-")
    cased = [parts[0].lower()] + [p.title() if len(p) == 4 else p.upper() for p in parts[1:]]
    canonical = "-".join(cased)
    match = _CODE_RE.match(canonical)
    if not match:
        raise UnknownLanguageError(f"{code!r} is not a language code: use ISO 639-1 / BCP-47, e.g. de, fr, "
                                   f"zh-Hans, pt-BR")
    if match["lang"] not in LANGUAGES:
        raise UnknownLanguageError(f"unknown language code {code!r}; known: {', '.join(sorted(LANGUAGES))}")
    if match["script"] and match["script"] not in SCRIPT_SUBTAGS:
        raise UnknownLanguageError(f"unknown script subtag in {code!r}; known: {', '.join(sorted(SCRIPT_SUBTAGS))}")
    return canonical


def parse_list(codes: str) -> list[str]:
    """`de, fr,cs` -> ["de", "fr", "cs"], normalised, duplicates removed, order kept."""
    out: list[str] = []
    for code in (c for c in codes.split(",") if c.strip()):
        canonical = normalize(code)
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise UnknownLanguageError("no language code given")
    return out


def primary(code: str) -> str:
    """`pt-BR` -> `pt`."""
    return code.split("-")[0].lower()


def language(code: str) -> Language:
    return LANGUAGES[primary(code)]


def display_name(code: str) -> str:
    """English name for prompts: `zh-Hant` -> "Chinese (Traditional)", `pt-BR` -> "Portuguese (Brazil)"."""
    name = language(code).name
    match = _CODE_RE.match(code)
    if match and match["script"] in ("Hans", "Hant"):
        return f"{name} ({'Simplified' if match['script'] == 'Hans' else 'Traditional'})"
    if match and match["region"] == "BR":
        return f"{name} (Brazil)"
    return name


def expected_scripts(code: str) -> frozenset[str]:
    match = _CODE_RE.match(code)
    if match and match["script"]:
        return frozenset(SCRIPT_SUBTAGS[match["script"]].split("+"))
    return language(code).scripts


def flores_code(code: str) -> str:
    """NLLB-200 code: `de` -> deu_Latn; `zh-Hant`/`zh-TW` -> zho_Hant; `sr-Latn` -> srp_Latn."""
    match = _CODE_RE.match(code)
    flores = language(code).flores
    if primary(code) == "zh" and match and (match["script"] == "Hant" or match["region"] in _TRADITIONAL_REGIONS):
        return "zho_Hant"
    if match and match["script"] and match["script"] in ("Latn", "Cyrl", "Arab", "Deva"):
        return f"{flores[:3]}_{match['script']}"
    return flores


# --------------------------------------------------------------------------- scripts of text

# The first word of a letter's Unicode name -> its script; anything else is its own script
# (e.g. "ETHIOPIC"). FULLWIDTH/HALFWIDTH forms count as their base script.
_NAME_TO_SCRIPT = {
    "LATIN": "Latin", "CYRILLIC": "Cyrillic", "GREEK": "Greek", "ARABIC": "Arabic", "HEBREW": "Hebrew",
    "CJK": "Han", "IDEOGRAPHIC": "Han", "HIRAGANA": "Hiragana", "KATAKANA": "Katakana",
    "KATAKANA-HIRAGANA": "Katakana", "HANGUL": "Hangul", "DEVANAGARI": "Devanagari", "THAI": "Thai",
    "BENGALI": "Bengali", "TAMIL": "Tamil", "TELUGU": "Telugu", "GUJARATI": "Gujarati",
    "GURMUKHI": "Gurmukhi", "KANNADA": "Kannada", "MALAYALAM": "Malayalam", "GEORGIAN": "Georgian",
    "ARMENIAN": "Armenian", "ETHIOPIC": "Ethiopic", "KHMER": "Khmer", "LAO": "Lao", "MYANMAR": "Myanmar",
    "SINHALA": "Sinhala",
}  # fmt: skip


@lru_cache(maxsize=65536)
def script_of(char: str) -> str | None:
    """Script of one letter, None for anything that is not a letter (digits, punctuation, marks)."""
    if not unicodedata.category(char).startswith("L"):
        return None
    words = unicodedata.name(char, "UNKNOWN").split()
    if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1:
        words = words[1:]
    return _NAME_TO_SCRIPT.get(words[0], words[0].title())


def script_counts(text: str) -> Counter:
    """Letters per script."""
    return Counter(s for s in map(script_of, text) if s is not None)
