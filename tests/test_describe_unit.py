"""The describe stage's pure parts, without Ray or an engine: planning, fingerprints, the
batch function and the exactly-once writer. The describer here is a recording fake (named as
such): these tests check the stage's bookkeeping; the real engines run in test_describe.py."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines import describe, store
from pipelines.describe import DescribeConfig, View
from pipelines.engines.base import DescribeResult, EngineConfig, SamplingConfig
from pipelines.media import MediaConfig, encode_pixels
from tests.conftest import run_cli


class RecordingFakeDescriber:
    """Answers every request with its prompt; fails requests whose prompt contains 'BAD'."""

    def __init__(self):
        self.calls = []

    def describe(self, requests):
        self.calls.append(requests)
        return [DescribeResult.failed("invalid_request", "bad prompt") if "BAD" in r.prompt else
                DescribeResult(text=f"{r.media_type}:{r.prompt}", prompt_tokens=3, output_tokens=2,
                               finish_reason="stop", latency_s=0.01) for r in requests]


def _cfg(tmp_path, **kw):
    engine = EngineConfig(engine="transformers", model="m", sampling=SamplingConfig(max_tokens=8))
    kw.setdefault("views", (View("a", "A {media}"), View("b", "B {media}")))
    return DescribeConfig(workdir=tmp_path, engine=engine, **kw)


def _loaded(item_id, pixels, views="a,b", media_type="image", error=None):
    data, shape = encode_pixels(pixels) if pixels is not None else (None, None)
    return {"item_id": item_id, "views": views, "attempts": [0] * len(views.split(",")), "media_type": media_type,
            "pixels": data, "shape": shape,
            "error_kind": "unreadable_image" if error else None, "error": error}


def test_describe_stream_one_row_per_item_and_view_errors_pass_through():
    fake = RecordingFakeDescriber()
    views = {"a": View("a", "A {media}"), "b": View("b", "BAD {media}")}
    loaded = [_loaded("i1", np.zeros((30, 40, 3), np.uint8)),
              _loaded("v1", np.zeros((4, 30, 40, 3), np.uint8), views="a", media_type="video"),
              _loaded("x", None, error="truncated")]
    chunks = list(describe.describe_stream(fake, loaded, views))
    rows = [row for chunk in chunks for row in chunk]
    # the item that failed to load comes back at once; a batch engine's answers in one chunk
    assert [[(r["item_id"], r["view"]) for r in chunk] for chunk in chunks] == [
        [("x", "a"), ("x", "b")], [("i1", "a"), ("i1", "b"), ("v1", "a")]]
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 3  # the failed item never reaches the engine
    by = {(r["item_id"], r["view"]): r for r in rows}
    assert by[("i1", "a")]["text"] == "image:A image" and by[("i1", "a")]["width"] == 40
    assert by[("i1", "b")]["error_kind"] == "invalid_request" and by[("i1", "b")]["text"] is None
    assert by[("v1", "a")]["text"] == "video:A video" and by[("v1", "a")]["n_frames"] == 4
    assert by[("x", "b")]["error"] == "truncated" and by[("x", "b")]["n_frames"] is None


def test_load_on_auto_keeps_images_on_a_gpu_engine_actor_and_videos_on_tasks(tmp_path):
    images, mixed = [{"media_type": "image"}] * 3, [{"media_type": "image"}, {"media_type": "video"}]
    auto = describe.loads_on_engine(_cfg(tmp_path))                      # transformers: an engine on a device
    assert auto(images) and not auto(mixed)
    vllm = EngineConfig(engine="vllm", model="m")
    assert describe.loads_on_engine(DescribeConfig(workdir=tmp_path, engine=vllm))(images)
    openai = EngineConfig(engine="openai", model="m")                    # its actor is the CPU-bound part
    assert describe.loads_on_engine(DescribeConfig(workdir=tmp_path, engine=openai)) is None
    assert describe.loads_on_engine(DescribeConfig(workdir=tmp_path, engine=openai, load_on="engine"))(mixed)
    assert describe.loads_on_engine(_cfg(tmp_path, load_on="tasks")) is None
    with pytest.raises(ValueError, match="load_on must be one of auto, engine, tasks"):
        _cfg(tmp_path, load_on="gpu")
    # the CLI's --load-on reaches the stage's config: a bad value is refused there, before any engine
    refused = run_cli("describe", "--workdir", tmp_path / "w", "--model", "m", "--load-on", "gpu")
    assert refused.returncode == 2 and "load_on must be one of auto, engine, tasks, got 'gpu'" in refused.stderr


def test_fingerprint_changes_with_prompt_model_sampling_and_preprocessing(tmp_path):
    base = describe.view_fingerprints(_cfg(tmp_path), "rev")
    assert base == describe.view_fingerprints(_cfg(tmp_path), "rev")
    assert base["a"] != base["b"]
    changed = [
        describe.view_fingerprints(_cfg(tmp_path), "rev2"),
        describe.view_fingerprints(_cfg(tmp_path, media=MediaConfig(max_pixels=100 * 100)), "rev"),
    ]
    cfg = _cfg(tmp_path)
    cfg.views = (View("a", "A different {media}"), View("b", "B {media}"))
    changed.append(describe.view_fingerprints(cfg, "rev"))
    cfg = _cfg(tmp_path)
    cfg.engine = EngineConfig(engine="transformers", model="m", sampling=SamplingConfig(max_tokens=8, temperature=0.7))
    changed.append(describe.view_fingerprints(cfg, "rev"))
    for fp in changed:
        assert fp["a"] != base["a"]
    assert changed[2]["b"] == base["b"]  # only the changed view is redone


def _write_manifest(workdir, n):
    import pyarrow as pa
    rows = [{"item_id": f"id{i:03d}", "dataset": "d", "root": "/", "relpath": f"{i}.jpg", "media_type": "image",
             "error_kind": "not_found" if i == 0 else None, "error": "gone" if i == 0 else None} for i in range(n)]
    store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.MANIFEST), workdir / "manifest" / "m.parquet")


def _items(shards) -> list[dict]:
    return [row for batch in shards.batches(100) for row in batch]


def test_plan_and_writer_are_exactly_once(tmp_path):
    _write_manifest(tmp_path, 5)
    cfg = _cfg(tmp_path, rows_per_file=3)
    fps = describe.view_fingerprints(cfg, "rev")
    plan = describe.make_plan(cfg, fps)
    assert (plan.rows_todo, plan.rows_done, plan.todo.rows, plan.ingest_errors.rows) == (10, 0, 4, 1)
    assert plan.engine_rows == 8
    report = describe.DescribeReport()
    writer = describe.DescriptionWriter(cfg, "rev", fps, report)
    # a "killed" run: rows stay in memory until rows_per_file is reached; what was never
    # flushed is simply redone on the next run
    rows = [{"item_id": i, "view": v, "media_type": "image", "text": "t", "attempt": 1}
            for i in ("id001", "id002") for v in "ab"]
    writer.add(rows[:2])
    assert store.parquet_files(tmp_path / "descriptions") == []
    writer.add(rows[2:])
    writer.add([{"item_id": "id003", "view": "a", "media_type": "image", "text": "lost", "attempt": 1}])
    files = store.parquet_files(tmp_path / "descriptions")
    assert len(files) == 1 and pq.read_table(files[0]).num_rows == 4
    plan = describe.make_plan(cfg, fps)
    assert plan.rows_done == 4 and plan.rows_todo == 6
    assert {i["item_id"]: i["views"] for i in _items(plan.todo)}["id003"] == "a,b"
    # the same rows again produce the same file name: a rewrite can never duplicate them
    writer2 = describe.DescriptionWriter(cfg, "rev", fps, describe.DescribeReport())
    writer2.add(rows)
    assert store.parquet_files(tmp_path / "descriptions") == files
    table = store.read_folder(tmp_path / "descriptions", schemas.DESCRIPTIONS)
    row = table.to_pylist()[0]
    assert row["engine"] == "transformers" and row["model_revision"] == "rev" and row["prompt"] == f"{row['view'].upper()} image"
    assert row["fingerprint"] == fps[row["view"]] and '"max_tokens":8' in row["sampling"]


def test_a_rerun_retries_transient_error_rows_and_the_latest_attempt_counts(tmp_path):
    _write_manifest(tmp_path, 4)      # id000 failed at ingest (not_found: permanent)
    cfg = _cfg(tmp_path, views=(describe.View("a", "A {media}"),))
    fps = describe.view_fingerprints(cfg, "rev")
    writer = describe.DescriptionWriter(cfg, "rev", fps, describe.DescribeReport())
    writer.add([{"item_id": "id000", "view": "a", "media_type": "image", "error_kind": "not_found", "error": "gone",
                 "attempt": 1},
                {"item_id": "id001", "view": "a", "media_type": "image", "error_kind": "http_503", "error": "down",
                 "attempt": 1},
                {"item_id": "id002", "view": "a", "media_type": "image", "error_kind": "invalid_request", "error": "x",
                 "attempt": 1},
                {"item_id": "id003", "view": "a", "media_type": "image", "text": "fine", "attempt": 1}])
    writer.flush()
    plan = describe.make_plan(cfg, fps)                     # a plain rerun: only the transient row
    assert [(i["item_id"], i["attempts"]) for i in _items(plan.todo)] == [("id001", [1])]
    assert (plan.rows_done, plan.rows_retried, plan.ingest_errors.rows) == (3, 1, 0)
    retry = describe.DescriptionWriter(cfg, "rev", fps, describe.DescribeReport())
    retry.add([{"item_id": "id001", "view": "a", "media_type": "image", "text": "now fine", "attempt": 2}])
    retry.flush()
    assert describe.make_plan(cfg, fps).rows_todo == 0
    # both attempts stay on disk; every reader sees one row per key, the latest
    assert store.read_folder(tmp_path / "descriptions", schemas.DESCRIPTIONS, all_attempts=True).num_rows == 5
    rows = {r["item_id"]: r for r in store.read_folder(tmp_path / "descriptions", schemas.DESCRIPTIONS).to_pylist()}
    assert len(rows) == 4 and (rows["id001"]["text"], rows["id001"]["attempt"]) == ("now fine", 2)
    assert rows["id003"]["attempt"] == 1
    # --retry-errors: the permanent ones too (the ingest failure goes back as an error row)
    cfg = _cfg(tmp_path, views=cfg.views, retry_errors=True)
    plan = describe.make_plan(cfg, fps)
    assert sorted(i["item_id"] for i in _items(plan.todo) + _items(plan.ingest_errors)) == ["id000", "id002"]
    assert plan.rows_retried == 2


def test_limit_takes_the_first_items_by_id(tmp_path):
    _write_manifest(tmp_path, 6)
    cfg = _cfg(tmp_path, limit=3)
    plan = describe.make_plan(cfg, describe.view_fingerprints(cfg, "r"))
    assert sorted(i["item_id"] for i in _items(plan.todo) + _items(plan.ingest_errors)) == ["id000", "id001", "id002"]
    assert plan.items_total == 6


def test_plan_without_manifest_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(store.StageInputError, match="has no manifest"):
        describe.make_plan(cfg, describe.view_fingerprints(cfg, "r"))


def test_views_file(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('[views]\nshort = "Name the main {media} subject."\n[sampling]\nmax_tokens = 12\n')
    views, sampling = describe.load_views_file(f)
    assert views == (View("short", "Name the main {media} subject."),) and sampling == {"max_tokens": 12}
    f.write_text("[views]\n")
    with pytest.raises(store.StageInputError, match=r"needs a \[views\] table"):
        describe.load_views_file(f)
