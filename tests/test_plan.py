"""The out-of-core describe plan (pipelines/plan.py): the same answer in one partition or many,
the same "latest attempt wins" rule as the readers (store.latest_attempts), files written
before the attempt column existed, and an evenly spread sample."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipelines import failures, store
from pipelines import plan as planner

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _manifest(workdir, n):
    rows = [{"item_id": f"id{i:04d}", "dataset": "d", "root": "/", "relpath": f"{i}.jpg", "media_type": "image"}
            for i in range(n)]
    store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.MANIFEST), workdir / "manifest" / "m.parquet")


def _descriptions(workdir, name, rows, drop_attempt=False):
    full = [{"view": "a", "fingerprint": "fa", "media_type": "image", **r} for r in rows]
    table = pa.Table.from_pylist(full, schema=schemas.DESCRIPTIONS)
    if drop_attempt:                       # a file written before retries existed
        table = table.drop_columns(["attempt"])
    (workdir / "descriptions").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, workdir / "descriptions" / f"{name}.parquet")


def _todo(plan) -> dict[str, list[int]]:
    return {r["item_id"]: r["attempts"] for batch in plan.todo.batches(7) for r in batch}


def test_many_partitions_plan_what_one_does(tmp_path, monkeypatch):
    _manifest(tmp_path, 50)
    _descriptions(tmp_path, "old", [{"item_id": f"id{i:04d}", "text": "t", "created_at": T0} for i in range(0, 50, 3)],
                  drop_attempt=True)
    _descriptions(tmp_path, "new", [{"item_id": f"id{i:04d}", "error_kind": "timeout", "attempt": 1, "created_at": T0}
                                    for i in range(1, 50, 3)])
    one = planner.describe_plan(tmp_path, {"a": "fa", "b": "fb"}, None, False)
    monkeypatch.setattr(planner, "PARTITION_KEYS", 14)    # 7 items x 2 views
    many = planner.describe_plan(tmp_path, {"a": "fa", "b": "fb"}, None, False)
    monkeypatch.setattr(planner, "MAX_OPEN_PARTITIONS", 2)  # the split in passes (groups of groups)
    grouped = planner.describe_plan(tmp_path, {"a": "fa", "b": "fb"}, None, False)
    try:
        assert len(many.todo.files) > 3 and len(one.todo.files) == 1
        assert _todo(one) == _todo(many) == _todo(grouped)
        assert (one.rows_done, one.rows_todo, one.rows_retried) == (many.rows_done, many.rows_todo, many.rows_retried)
        assert [p.name for p in many.todo.files] == [p.name for p in grouped.todo.files]
        # view a: 17 done (old files count as attempt 1), 17 timeouts retried, 16 new; view b: all 50 new
        assert (one.rows_done, one.rows_todo, one.rows_retried) == (17, 83, 17)
        assert _todo(one)["id0001"] == [1, 0] and _todo(one)["id0002"] == [0, 0] and "id0000" in _todo(one)
    finally:
        one.close()
        many.close()
        grouped.close()


def test_the_plan_and_the_readers_agree_on_the_latest_attempt(tmp_path):
    _manifest(tmp_path, 4)
    rows = [  # (item, error_kind, attempt, created_at)
        ("id0000", "timeout", None, 0), ("id0000", None, 2, 1),                    # retried: fine now
        ("id0001", None, 1, 0), ("id0001", "http_503", 2, 1),                     # --retry-errors'd, failed again
        ("id0002", "http_500", 3, 5), ("id0002", None, 3, 4),                     # a tie: the later row
        ("id0003", "not_found", None, 0),                                         # permanent
    ]
    _descriptions(tmp_path, "x", [{"item_id": i, "error_kind": e, "attempt": a, "created_at": T0 + dt.timedelta(s)}
                                  for i, e, a, s in rows])
    latest = store.read_folder(tmp_path / "descriptions", schemas.DESCRIPTIONS).to_pylist()
    failed = {r["item_id"] for r in latest if r["error_kind"] and r["error_kind"] != "not_found"}
    assert failed == {"id0001", "id0002"}
    plan = planner.describe_plan(tmp_path, {"a": "fa"}, None, False)
    try:
        assert _todo(plan) == {"id0001": [2], "id0002": [3]}
    finally:
        plan.close()


def test_spread_takes_evenly_spaced_rows_across_shards(tmp_path, monkeypatch):
    _manifest(tmp_path, 40)
    monkeypatch.setattr(planner, "PARTITION_KEYS", 9)
    plan = planner.describe_plan(tmp_path, {"a": "fa"}, None, False)
    try:
        every = [r["item_id"] for batch in plan.todo.batches(5) for r in batch]
        assert len(every) == plan.todo.rows == 40 and len(set(every)) == 40
        sample = [r["item_id"] for r in plan.todo.spread(10)]
        assert sample == every[::4]
    finally:
        plan.close()
    assert not plan.folder.exists()


def test_the_sql_of_the_planners_and_the_failure_table_agree():
    """The planners match error kinds in SQL (failures.permanent_kinds); the summary and the
    README use failures.is_transient: one table, two uses."""
    kinds = ["timeout", "connection", "http_429", "http_500", "http_503", "http_401", "http_404", "http_400",
             "http_413", "http_422", "bad_response", "load_failed", "something_new", "not_found", "too_large",
             "invalid_request", "refused", "empty_source", "source_too_long", "unreadable_video", "bad_filename"]
    permanent = failures.permanent_kinds()
    assert [k for k in kinds if failures.is_transient(k)] == [k for k in kinds if k not in permanent]
    assert {"http_400", "not_found", "refused", "empty_source", "bad_filename", "bad_annotation"} <= permanent
    assert not failures.is_transient(None)


def _with_nulls(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) if f.name in table.column_names
                                 else pa.nulls(table.num_rows, f.type) for f in schema], schema=schema)


def test_five_views_over_100k_items_plan_within_the_memory_cap(tmp_path):
    """Partitions are sized by keys (items x views): sized by items, five views put 500k keys
    in one partition and DuckDB ran out of its 64 MB cap (found by bench/plan_memory.py)."""
    n, views = 100_000, {v: f"fp-{v}" for v in ("objects", "scene", "actions", "attributes", "detailed")}
    ids = pa.array([f"coco2017:{i:012d}" for i in range(n)])
    manifest = pa.table({"item_id": ids, "dataset": pa.array(["coco"] * n), "root": pa.array(["/data/coco"] * n),
                         "relpath": pa.array([f"{i:012d}.jpg" for i in range(n)]),
                         "media_type": pa.array(["image"] * n)})
    store.write_atomic(_with_nulls(manifest, schemas.MANIFEST), tmp_path / "manifest" / "m.parquet")
    done = ids.take(pa.array(range(0, n, 2)))                # half the items, every view described
    rows = pa.table({"item_id": pa.concat_arrays([done] * len(views)),
                     "view": pa.array([v for v in views for _ in range(len(done))]),
                     "fingerprint": pa.array([fp for fp in views.values() for _ in range(len(done))]),
                     "created_at": pa.array([T0] * (len(done) * len(views)), pa.timestamp("us", tz="UTC"))})
    store.write_atomic(_with_nulls(rows, schemas.DESCRIPTIONS), tmp_path / "descriptions" / "part-x.parquet")
    plan = planner.describe_plan(tmp_path, views, None, False)
    try:
        assert (plan.rows_done, plan.rows_todo, plan.todo.rows) == (n // 2 * 5, n // 2 * 5, n // 2)
        assert len(plan.todo.files) == 5                      # 500k keys in partitions of 100k
    finally:
        plan.close()


def test_a_workdir_whose_files_all_predate_the_attempt_column_plans(tmp_path):
    _manifest(tmp_path, 6)
    _descriptions(tmp_path, "old", [{"item_id": f"id{i:04d}", "error_kind": "timeout" if i == 1 else None,
                                     "text": "t", "created_at": T0} for i in range(3)], drop_attempt=True)
    plan = planner.describe_plan(tmp_path, {"a": "fa"}, None, False)
    try:   # 0 and 2 done; 1 failed transiently (attempt null = 1): its next attempt is 2
        assert _todo(plan) == {"id0001": [1], "id0003": [0], "id0004": [0], "id0005": [0]}
    finally:
        plan.close()
