"""Translation with a chat LLM: the prompt, and cleaning of the answer.

Instruction-tuned models wrap translations in chatter: "Here is the German translation:",
quotes, "(Note: ...)" paragraphs, <think> blocks. `clean_answer` removes those; what cannot be
cleaned (a refusal, an explanation, several alternatives) is left for the quality check
`not_a_translation` to flag, never silently dropped.
"""

from __future__ import annotations

import re

from pipelines import languages

DEFAULT_PROMPT = (
    "Translate this image caption from {source} into {target}. Keep its meaning and level of detail. "
    "Answer with the {target} translation only, without quotes, notes or explanations.\n\n{text}"
)


def check_template(template: str) -> None:
    if "{text}" not in template:
        raise ValueError("the translation prompt must contain {text} (and may use {source} and {target})")


def prompt_for_pair(template: str, source_lang: str, target_lang: str) -> str:
    """The template with the language names filled in; {text} stays (recorded as provenance)."""
    return (template.replace("{source}", languages.display_name(source_lang))
            .replace("{target}", languages.display_name(target_lang)))


def render(template: str, text: str, source_lang: str, target_lang: str) -> str:
    # replace {text} last, so braces inside a caption are never read as placeholders
    return prompt_for_pair(template, source_lang, target_lang).replace("{text}", text)


_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
# words that announce a translation, in English and the benchmark languages
_ANNOUNCE = (r"translation|translated|traduction|traducción|tradução|traduzione|übersetzung|překlad"
             r"|перевод|翻译|翻譯|翻訳|번역")
_CHATTER_LINE_RE = re.compile(rf"^\W*(?:sure|certainly|of course|okay|ok|here|below|the|this|my|a|{_ANNOUNCE})\b"
                              rf".{{0,80}}\b(?:{_ANNOUNCE})\b.{{0,60}}[:：]\W*$|^\W*(?:sure|certainly|of course|okay)\W*$",
                              re.IGNORECASE)
_INLINE_PREAMBLE_RE = re.compile(rf"^\W*(?:(?:sure|certainly|okay)\W+)?(?:here(?:'s| is)|below is)?\s*(?:the|a|my)?\s*"
                                 rf"(?:\w+\s+){{0,3}}(?:{_ANNOUNCE})\b[^:：\n]{{0,50}}[:：]\s*(?=\S)", re.IGNORECASE)
_NOTE_START_RE = re.compile(r"^\W*(?:note|notes|explanation|literally|literal translation|alternative(?:ly)?|or\b"
                            r"|this translation|i translated|i have translated|translation notes)\b", re.IGNORECASE)
_TRAILING_NOTE_RE = re.compile(r"\s*\((?:note|notes|literally|lit\.|or)\b[^()]*\)\s*$", re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "“": "”", "„": "“", "«": "»", "»": "«", "'": "'", "‘": "’", "‚": "‘", "「": "」",
                "『": "』", "`": "`", "”": "”"}


def clean_answer(answer: str, source: str, target_lang: str) -> str:
    """The translation inside an LLM answer (see the module docstring); may be empty."""
    text = _THINK_RE.sub("", answer).strip()
    lines = [line.strip() for line in text.splitlines()]
    while lines and (not lines[0] or _CHATTER_LINE_RE.match(lines[0]) or _is_label(lines[0], target_lang)):
        lines.pop(0)
    # drop trailing notes: from the first line that starts like one (after the translation)
    for i, line in enumerate(lines[1:], 1):
        if _NOTE_START_RE.match(line):
            lines = lines[:i]
            break
    text = "\n".join(lines).strip()
    if not re.search(_ANNOUNCE, source, re.IGNORECASE):   # a caption about translation keeps its words
        text = _INLINE_PREAMBLE_RE.sub("", text, count=1)
    text = _strip_label(text, target_lang)
    text = _TRAILING_NOTE_RE.sub("", text).strip()
    return _strip_quotes(text, source)


def _label_words(target_lang: str) -> list[str]:
    return [languages.display_name(target_lang), languages.language(target_lang).name, target_lang]


def _is_label(line: str, target_lang: str) -> bool:
    """A line that is only "German:" or "Translation:"."""
    bare = line.rstrip(":：").strip().casefold()
    return line.rstrip().endswith((":", "：")) and bare in {w.casefold() for w in [*_label_words(target_lang),
                                                                                     "translation"]}


def _strip_label(text: str, target_lang: str) -> str:
    """"German: Ein Hund" -> "Ein Hund"."""
    for word in _label_words(target_lang):
        match = re.match(rf"^\W*{re.escape(word)}\s*(?:translation)?\s*[:：]\s*(?=\S)", text, re.IGNORECASE)
        if match:
            return text[match.end():]
    return text


def _strip_quotes(text: str, source: str) -> str:
    for _ in range(2):  # "«Ein Hund»" inside quotes: at most two layers
        if len(text) < 2 or text[0] not in _QUOTE_PAIRS or text[-1] != _QUOTE_PAIRS[text[0]]:
            break
        inner = text[1:-1]
        source_quoted = len(source) >= 2 and source[0] == text[0] and source[-1] == text[-1]
        if source_quoted or _QUOTE_PAIRS[text[0]] in inner:   # '"a" and "b"' keeps its quotes
            break
        text = inner.strip()
    return text
