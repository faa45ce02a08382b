"""The describe stage: detailed MLLM descriptions of every item, one row per (item, view).

Data flow (the shared runner, pipelines/runner.py): manifest rows still to do -> `load_batch`
on Ray CPU tasks (safe decode, EXIF, RGB, bounded pixels; video frames with decord) ->
`describe_stream` on engine actors (one engine each; one per GPU), which hands back each row
as soon as its request finishes -> the driver, which adds provenance and writes Parquet
files under names derived from their row keys, atomically. A rerun reads the keys already
written (item, view, fingerprint) and only does the rest, so a killed run resumes with every
row exactly once, and a changed model/prompt/sampling (a new fingerprint) never reuses text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
import tomllib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import schemas
from pipelines import ids, store
from pipelines.engines.base import DescribeRequest, EngineConfig, make_describer, results_as_completed
from pipelines.ingest import IngestConfig, IngestReport
from pipelines.media import MediaConfig, MediaError, decode_pixels, encode_pixels, load_media
from pipelines.progress import progress_bar
from pipelines.plan import DescribePlan, PlanShards, describe_plan
from pipelines.runner import (CPU_ENGINES, Batches, EngineStep, StreamReport, enforce_error_rate, stream,
                              write_as_they_come)
from pipelines.shards import KeyedWriter
from pipelines.storage import Where, at


@dataclass(frozen=True)
class View:
    """A named prompt; `{media}` in the template becomes "image" or "video"."""
    name: str
    template: str

    def prompt_for(self, media_type: str) -> str:
        return self.template.replace("{media}", media_type or "image")


DEFAULT_VIEWS = (
    View("objects", "List the objects visible in this {media}, with their colours, counts and positions."),
    View("scene", "Describe the setting of this {media}: the place, the background, the lighting and the mood."),
    View("actions", "Describe what the people, animals and objects in this {media} are doing."),
    View("attributes", "Describe the main subjects of this {media}: their shapes, sizes, colours, materials, "
                       "clothing and how they are arranged relative to each other."),
    View("detailed", "Describe this {media} in detail."),
)


LOAD_ON = ("auto", "engine", "tasks")


@dataclass
class DescribeConfig:
    workdir: Where                         # a local path or a URI (s3://...): pipelines/storage.py
    engine: EngineConfig
    views: tuple[View, ...] = DEFAULT_VIEWS
    media: MediaConfig = field(default_factory=MediaConfig)
    ingest: IngestConfig | None = None     # set when `--input` is given: ingest first
    limit: int | None = None               # at most this many items (in item_id order)
    dry_run: bool = False
    tokens_per_s: float | None = None     # dry run: GPU output tok/s for the cost estimate
    overwrite: bool = False
    retry_errors: bool = False             # also redo rows whose last attempt failed permanently
    max_error_rate: float = 0.25           # fail the run (exit 1) above this share of error rows
    executor: str = "ray"                  # ray | local (one engine in this process: tests, tiny runs)
    ray_address: str | None = None         # None: RAY_ADDRESS or a local Ray
    num_engines: int | None = None         # None: one per GPU (tensor-parallel aware), else 1
    engine_num_cpus: float = 1.0
    load_num_cpus: float = 0.5             # fractional: on 2 cores whole CPUs starve the engine
    load_on: str = "auto"                  # Ray: where media is loaded (LOAD_ON; see loads_on_engine)
    batch_size: int = 32                   # items per dispatch to an engine and per load task (a request per view)
    max_in_flight: int | None = None       # requests owed per engine; None: 2x what it runs at once + 2 batches
    stall_timeout_s: float = 600.0         # stop (exit 1) when no row finishes for this long; 0: never
    rows_per_file: int = 2048
    progress: bool = True

    def __post_init__(self) -> None:
        self.workdir = at(self.workdir)
        if self.load_on not in LOAD_ON:
            raise ValueError(f"load_on must be one of {', '.join(LOAD_ON)}, got {self.load_on!r}")


@dataclass
class DescribeReport(StreamReport):
    items_total: int = 0
    items_planned: int = 0
    rows_done_before: int = 0
    rows_todo: int = 0
    rows_retried: int = 0                  # rows to do that failed before (their next attempt)
    prompt_tokens: int = 0
    output_tokens: int = 0
    ingest: IngestReport | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    cost: dict | None = None               # dry run: pipelines.cost.estimate_describe

    def as_dict(self) -> dict[str, Any]:
        out = self.stream_dict()
        per_row = self.rows_per_s / self.rows_written if self.rows_written else 0.0
        out.update(output_tokens_per_s=self.output_tokens * per_row, prompt_tokens_per_s=self.prompt_tokens * per_row)
        return out


# --------------------------------------------------------------------------- views & provenance

def load_views_file(path: Path) -> tuple[tuple[View, ...], dict[str, Any]]:
    """A TOML file with a [views] table (name = prompt) and an optional [sampling] table."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise store.StageInputError(f"views file {path}: {err}") from None
    views = data.get("views", {})
    if not isinstance(views, dict) or not views or not all(isinstance(v, str) for v in views.values()):
        raise store.StageInputError(f"views file {path} needs a [views] table of name = \"prompt\" entries")
    return tuple(View(k, v) for k, v in views.items()), dict(data.get("sampling", {}))


def model_revision(cfg: EngineConfig) -> str:
    """The revision asked for; for a local folder, a hash of its files' names, sizes and config."""
    if cfg.revision:
        return cfg.revision
    folder = Path(cfg.model)
    if not folder.is_dir():
        return "unpinned"
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder)}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json":
            h.update(path.read_bytes())
    return "local-" + h.hexdigest()[:16]


def view_fingerprints(cfg: DescribeConfig, revision: str) -> dict[str, str]:
    e = cfg.engine
    base = {"stage": "describe", "schema": schemas.SCHEMA_VERSION, "engine": e.engine, "model": e.model,
            "revision": revision, "sampling": e.sampling.as_dict(), "media": asdict(cfg.media),
            "video_input": e.video_input}
    return {v.name: ids.fingerprint({**base, "view": v.name, "template": v.template}) for v in cfg.views}


# --------------------------------------------------------------------------- pure batch functions

def load_batch(items: list[dict], media_cfg: MediaConfig) -> list[dict]:
    """Load and preprocess each item's media; a bad item becomes a row with its error."""
    out = []
    for item in items:
        row = {"item_id": item["item_id"], "views": item["views"], "attempts": item["attempts"],
               "media_type": item["media_type"],
               "pixels": None, "shape": None, "error_kind": None, "error": None}
        try:
            loaded = load_media(item["root"], item["relpath"], media_cfg)
            row["pixels"], row["shape"] = encode_pixels(loaded.pixels)
        except MediaError as err:
            row["error_kind"], row["error"] = err.kind, str(err)
        except Exception as err:  # noqa: BLE001 - an unexpected decoder failure is still one item's error
            row["error_kind"], row["error"] = "load_failed", f"{type(err).__name__}: {err}"
        out.append(row)
    return out


def loads_on_engine(cfg: DescribeConfig) -> Callable[[list[dict]], bool] | None:
    """On Ray, which batches the engine actor loads itself rather than a load task (None: none).

    auto: batches of images only, for engines on a device (vLLM, transformers). An image costs
    ~2.6 ms of CPU to load, less than its load task, object and transfer cost Ray's processes,
    which share the node's CPUs with the engine's own scheduler and input processing
    (docs/benchmarks.md, "describe, device-bound": 8-10% more rows/s at 1 view, level at 5).
    A batch with a video stays on tasks: a video costs 50-150 images' worth of decoding, which
    tasks spread over the node's cores and other nodes. The openai engine's actor is itself
    the CPU-bound part (encoding, HTTP), so its loading stays on tasks too: loading in its
    actor moved 32-38% fewer rows/s at 1 view and level at 5 (docs/benchmarks.md, "pipeline
    ceiling", tenth session)."""
    if cfg.load_on == "engine":
        return _every_batch
    if cfg.load_on == "tasks" or (cfg.load_on == "auto" and cfg.engine.engine in CPU_ENGINES):
        return None
    return _images_only


def _every_batch(items: list[dict]) -> bool:
    return True


def _images_only(items: list[dict]) -> bool:
    return all(item["media_type"] != "video" for item in items)


def describe_stream(describer: Any, loaded: list[dict], views: dict[str, View]) -> Iterator[list[dict]]:
    """Expand loaded items into one request per view, run them, and yield output rows as their
    requests finish (rows of items that failed to load first)."""
    rows, requests, slots = [], [], []
    for item in loaded:
        # decoded once per item: its views' requests share this array (engines encode it once)
        pixels = decode_pixels(item["pixels"], item["shape"]) if item["pixels"] is not None else None
        video = item["media_type"] == "video"
        geometry = {"n_frames": (pixels.shape[0] if video else 1) if pixels is not None else None,
                    "height": pixels.shape[-3] if pixels is not None else None,
                    "width": pixels.shape[-2] if pixels is not None else None}
        # an item's views go out together (a shared prefix); each row is its key's next attempt
        for name, attempts in zip(item["views"].split(","), item["attempts"]):
            row = {"item_id": item["item_id"], "view": name, "media_type": item["media_type"], **geometry,
                   "error_kind": item["error_kind"], "error": item["error"], "attempt": attempts + 1}
            if pixels is None:
                rows.append(row)
            else:
                requests.append(DescribeRequest(views[name].prompt_for(item["media_type"]), item["media_type"], pixels))
                slots.append(row)
    if rows:
        yield rows
    for chunk in results_as_completed(describer, requests, describer.describe):
        done = []
        for index, result in chunk:
            row = slots[index]
            row.update(text=result.text, prompt_tokens=result.prompt_tokens, output_tokens=result.output_tokens,
                       finish_reason=result.finish_reason, latency_s=result.latency_s,
                       error_kind=result.error_kind, error=result.error)
            done.append(row)
        yield done


# --------------------------------------------------------------------------- planning

def make_plan(cfg: DescribeConfig, fingerprints: dict[str, str]) -> DescribePlan:
    """The (item, view) rows still to do, out of core (pipelines.plan): a key is done when its
    latest attempt succeeded or failed permanently (with --retry-errors: only succeeded)."""
    return describe_plan(cfg.workdir, {v.name: fingerprints[v.name] for v in cfg.views}, cfg.limit,
                         cfg.retry_errors)


# --------------------------------------------------------------------------- output

class DescriptionWriter:
    """Adds provenance to engine rows, counts them, and writes them exactly once."""

    def __init__(self, cfg: DescribeConfig, revision: str, fingerprints: dict[str, str], report: DescribeReport):
        self.cfg, self.revision, self.fingerprints, self.report = cfg, revision, fingerprints, report
        self.views = {v.name: v for v in cfg.views}
        self.sampling = ids.canonical_json(cfg.engine.sampling.as_dict())
        self.out = KeyedWriter(cfg.workdir / store.DESCRIPTIONS_DIR, schemas.DESCRIPTIONS,
                               key=lambda r: f"{r['item_id']}/{r['view']}/{r['fingerprint']}/{r['attempt']}",
                               rows_per_file=cfg.rows_per_file)

    def add(self, rows: Iterable[dict]) -> int:
        """Add engine rows; returns how many."""
        now = dt.datetime.now(dt.timezone.utc)
        full = []
        for row in rows:
            view = self.views[row["view"]]
            full.append({**row, "engine": self.cfg.engine.engine, "model": self.cfg.engine.model,
                         "model_revision": self.revision, "prompt": view.prompt_for(row["media_type"]),
                         "sampling": self.sampling, "fingerprint": self.fingerprints[view.name], "created_at": now})
            if row.get("error_kind"):
                self.report.errors[row["error_kind"]] += 1
            self.report.prompt_tokens += row.get("prompt_tokens") or 0
            self.report.output_tokens += row.get("output_tokens") or 0
        self.out.add(full)
        self.report.rows_written = self.out.rows_written
        return len(full)

    def flush(self) -> None:
        self.out.flush()
        self.report.rows_written = self.out.rows_written


# --------------------------------------------------------------------------- the run

def run(cfg: DescribeConfig) -> DescribeReport:
    report = DescribeReport(dry_run=cfg.dry_run)
    started = time.perf_counter()
    with store.exclusive(cfg.workdir, "describe"):
        if cfg.ingest is not None:
            from pipelines import ingest
            report.ingest = ingest.run(cfg.ingest)
        folder = cfg.workdir / store.DESCRIPTIONS_DIR
        if cfg.overwrite and not cfg.dry_run:
            folder.remove_tree()
        store.remove_temp_files(folder)
        revision = model_revision(cfg.engine)
        report.fingerprints = view_fingerprints(cfg, revision)
        plan = make_plan(cfg, report.fingerprints)
        try:
            _run_plan(cfg, plan, revision, report, started)
        finally:
            plan.close()
        if cfg.dry_run:
            return report
    report.wall_s = time.perf_counter() - started
    enforce_error_rate(report, cfg.max_error_rate)
    return report


def _run_plan(cfg: DescribeConfig, plan: DescribePlan, revision: str, report: DescribeReport, started: float) -> None:
    report.items_total, report.rows_done_before, report.rows_todo = plan.items_total, plan.rows_done, plan.rows_todo
    report.items_planned, report.rows_retried = plan.todo.rows + plan.ingest_errors.rows, plan.rows_retried
    if cfg.dry_run:
        from pipelines import cost
        report.cost = cost.estimate_describe(cfg, plan, cfg.tokens_per_s).as_dict()
        return
    writer = DescriptionWriter(cfg, revision, report.fingerprints, report)
    with progress_bar("describe", plan.rows_todo, cfg.progress) as advance:
        try:
            rows_before = 0
            for batch in plan.ingest_errors.batches(cfg.rows_per_file):
                rows_before += writer.add(_ingest_error_rows(batch))
            advance(rows_before)
            if plan.todo.rows:
                _stream_rows(cfg, plan.todo, writer, advance, report, started, rows_before)
        finally:
            writer.flush()  # whatever completed is kept, also on a fatal error


def _ingest_error_rows(items: list[dict]) -> list[dict]:
    return [{"item_id": i["item_id"], "view": name, "media_type": i["media_type"],
             "error_kind": i["error_kind"], "error": i["error"], "attempt": attempts + 1}
            for i in items for name, attempts in zip(i["views"].split(","), i["attempts"])]


# --------------------------------------------------------------------------- engine plumbing

def _stream_rows(cfg: DescribeConfig, todo: PlanShards, writer: DescriptionWriter, advance,
                 report: DescribeReport, started: float, rows_before: int) -> None:
    """Run load -> engine through the shared runner and write results as they stream in."""
    # batch_size counts items, whatever the views: each batch costs a load task, an actor call and
    # a thread. Counting requests made 6-item batches at 5 views, five times as many (1536 images,
    # 5 views, Ray, 2 cores: 136 rows/s, against 153 with 32-item batches; docs/benchmarks.md)
    # read from the plan's shards as the engines take them: the driver never holds the plan
    rows = Batches(todo.batches(cfg.batch_size), todo.rows)
    step = EngineStep(make_engine=partial(make_describer, cfg.engine),
                      stream_fn=partial(describe_stream, views={v.name: v for v in cfg.views}),
                      batch_size=cfg.batch_size, outputs_per_input=len(cfg.views),
                      max_in_flight=cfg.max_in_flight, num_cpus=cfg.engine_num_cpus,
                      prepare=partial(load_batch, media_cfg=cfg.media),
                      prepare_num_cpus=cfg.load_num_cpus, prepare_on_engine=loads_on_engine(cfg),
                      row_key=lambda r: (r["item_id"], r["view"]))
    results = stream(rows, step, executor=cfg.executor, engine_cfg=cfg.engine, ray_address=cfg.ray_address,
                     num_engines=cfg.num_engines, stall_timeout_s=cfg.stall_timeout_s, engine_queue=report.engine_queue)
    write_as_they_come(results, writer.add, advance, report, started, rows_before=rows_before)
