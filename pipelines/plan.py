"""Planning that scales: what a stage still has to do, computed out of core and kept on disk.

The describe plan is an anti-join of the manifest x views against the keys already done in
`descriptions/` (the latest attempt of each key counts; pipelines.failures says which failures
are done), run by DuckDB over the Parquet files column-wise. The key space is cut into
partitions by a hash of item_id, about PARTITION_KEYS (item, view) keys each, and each partition is
planned on its own, so the driver's memory does not grow with the dataset: the plan goes to
Parquet shards in a temp folder, one per partition, and the stage reads them back a batch at a
time (`PlanShards.batches`). Each plan row is an item with the views still to do and, per view,
the attempts already made (0: never), so that a retried row is written as the next attempt
without the driver keeping a map of every key.

A workdir in object storage is planned the same way: its files' key columns are first copied
into the plan folder (`local_files`, 64k rows at a time), since DuckDB reads object stores
only through an extension that would have to be downloaded.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipelines import failures, store
from pipelines.storage import Loc, Where, at

PARTITION_KEYS = 100_000        # keys planned at once (describe: items x views): bounds the planner's memory
DUCKDB_MEMORY = "64MB"          # DuckDB's own limit: it spills to the plan folder beyond it, so the driver stays flat
SPREAD_SAMPLE = 2000
COPY_BATCH = 65_536             # rows at a time when a bucket's key columns are copied down
MAX_OPEN_PARTITIONS = 8         # partition files DuckDB writes at once within DUCKDB_MEMORY (with the flush below)
# what latest_sql and the planners read of a stage's output files
DONE_COLUMNS = ["item_id", "view", "source_caption_id", "lang", "origin", "fingerprint", "attempt", "created_at",
                "error_kind"]


@dataclass
class PlanShards:
    """Rows of a plan in Parquet files; `batches` reads them back lazily, in file order."""
    files: list[Path] = field(default_factory=list)
    rows: int = 0                  # plan rows (describe: items)

    def batches(self, size: int) -> Iterator[list[dict]]:
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
                yield batch.to_pylist()

    def add(self, path: Path) -> int:
        """Keep a shard just written (an empty one is deleted); returns its rows."""
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows:
            self.files.append(path)
            self.rows += rows
        else:
            path.unlink()
        return rows

    def spread(self, k: int = SPREAD_SAMPLE) -> list[dict]:
        """At most k rows, evenly spread over the plan (the dry run's cost sample); only the
        shards that hold one are read."""
        if self.rows <= k:
            return [row for batch in self.batches(4096) for row in batch]
        wanted = sorted({int(i * self.rows / k) for i in range(k)})
        chosen, offset = [], 0
        for path in self.files:
            rows = pq.ParquetFile(path).metadata.num_rows
            local = [i - offset for i in wanted if offset <= i < offset + rows]
            if local:
                chosen.extend(pq.read_table(path).take(local).to_pylist())
            offset += rows
        return chosen


@dataclass
class DescribePlan:
    folder: Path                   # the temp folder holding the shards (removed by `close`)
    items_total: int               # manifest rows
    # items to send to the engine: item_id, media_type, root, relpath, error_kind, error, views, attempts
    todo: PlanShards = field(default_factory=PlanShards)
    ingest_errors: PlanShards = field(default_factory=PlanShards)   # failed at ingest: error rows, no engine
    rows_done: int = 0
    rows_todo: int = 0
    rows_retried: int = 0          # rows to do whose earlier attempt failed
    engine_rows: int = 0           # rows to do that go to the engine (not ingest errors)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def planning() -> Iterator[tuple[Any, Path]]:
    """A DuckDB connection with a bounded memory, and a new temp folder that it spills into
    and that holds the plan's shards: the folder is removed if planning fails (else the plan
    owns it); the connection is closed either way."""
    import duckdb
    folder = Path(tempfile.mkdtemp(prefix="leccr-plan-"))
    con = duckdb.connect()
    try:
        # no query relies on insertion order (each orders what it writes); keeping it costs memory
        # partitioned writes buffer up to the flush threshold (rows, all partitions together)
        con.execute(f"SET memory_limit='{DUCKDB_MEMORY}'; SET threads=1; SET temp_directory='{folder / 'spill'}'; "
                    f"SET preserve_insertion_order=false; SET partitioned_write_flush_threshold=100000")
        yield con, folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        con.close()


def done_rows_sql(files: list[Path], keys: list[str], where: str) -> str:
    """The rows of a stage's output files that `where` selects: their `keys` columns and what
    decides a key's latest attempt (attempt, created_at, error_kind; files written before a
    column existed read it as null). No files: no rows."""
    optional = {"attempt": "INTEGER", "created_at": "TIMESTAMPTZ", "error_kind": "VARCHAR"}
    if not files:
        columns = [f"NULL::VARCHAR AS {k}" for k in keys] + [f"NULL::{t} AS {c}" for c, t in optional.items()]
        return f"SELECT {', '.join(columns)} WHERE false"
    names = set().union(*(pq.read_schema(f).names for f in files))
    columns = keys + [c if c in names else f"NULL::{t} AS {c}" for c, t in optional.items()]
    return f"SELECT {', '.join(columns)} FROM read_parquet({paths_sql(files)}, union_by_name = true) WHERE {where}"


def latest_sql(done_rows: str, keys: list[str]) -> str:
    """Per key of `done_rows` (a relation from done_rows_sql), the attempts so far and the
    error_kind of the latest attempt: the rule of store.latest_attempts, in SQL."""
    key_list = ", ".join(keys)
    return (f"SELECT {key_list}, max(coalesce(attempt, 1)) AS attempts, "
            f"arg_max_null(error_kind, (coalesce(attempt, 1), created_at)) AS last_error "
            f"FROM {done_rows} GROUP BY {key_list}")


def split_by_hash(con, query: str, key: str, partitions: int, folder: Path) -> list[str]:
    """The rows of `query` split by hash(key) into `partitions` relations, written once as
    Parquet files per partition: a partition is then read on its own, where filtering a rescan
    of everything per partition made planning grow with the square of the dataset."""
    if partitions == 1:
        return [f"({query})"]
    _split(con, f"SELECT *, hash({key}) % {partitions} AS hash_part FROM ({query})", 0, partitions, folder)
    relations = []
    for part in range(partitions):
        files = sorted(folder.glob(f"**/hash_part={part}/*.parquet"))
        # the partition column is in the folder names only (hive style): the files hold the query's columns
        relations.append(f"read_parquet({paths_sql(files)}, hive_partitioning = false)" if files
                         else f"(SELECT * FROM ({query}) WHERE false)")
    return relations


def _split(con, rows: str, low: int, high: int, folder: Path) -> None:
    """Write `rows` (with their hash_part in [low, high)) into folder/**/hash_part=N/. DuckDB
    keeps a writer open per output folder, and only about MAX_OPEN_PARTITIONS fit in its 64 MB
    (at 10M items, 16 and 32 did not, at random): more partitions are split into that many
    groups first, each group then on its own (log_MAX_OPEN_PARTITIONS passes in all)."""
    folder.mkdir(parents=True)
    if high - low <= MAX_OPEN_PARTITIONS:
        _copy_partitioned(con, rows, "hash_part", folder / "parts")
        return
    width = math.ceil((high - low) / MAX_OPEN_PARTITIONS)
    groups = folder / "groups"
    _copy_partitioned(con, f"SELECT *, (hash_part - {low}) // {width} AS hash_group FROM ({rows})", "hash_group", groups)
    for group in sorted(groups.iterdir()):
        number = int(group.name.split("=")[1])
        files = sorted(group.glob("*.parquet"))
        _split(con, f"SELECT * FROM read_parquet({paths_sql(files)}, hive_partitioning = false)",
               low + number * width, min(high, low + (number + 1) * width), folder / f"g{number}")
        shutil.rmtree(group)
    groups.rmdir()


def _copy_partitioned(con, query: str, column: str, folder: Path) -> None:
    """Rows of `query` into folder/<column>=<value>/*.parquet, without `column` in the files."""
    con.execute(f"COPY ({query}) TO '{folder}' (FORMAT parquet, PARTITION_BY ({column}))")


def still_failed_sql(last_error: str, retry_errors: bool) -> str:
    """Whether a key whose latest attempt failed with `last_error` (a column) is still to do
    (pipelines.failures: transient kinds; with --retry-errors, every kind)."""
    if retry_errors:
        return f"{last_error} IS NOT NULL"
    return f"{last_error} IS NOT NULL AND {last_error} NOT IN ({sql_list(failures.permanent_kinds())})"


def local_files(files: list[Where], columns: list[str], folder: Path, name: str) -> list[Path]:
    """The files as local paths for DuckDB: local files as they are; files in object storage
    copied into `folder` (as name-00000.parquet, ... in their order), only those of `columns`
    that each has, COPY_BATCH rows at a time."""
    local = []
    for i, loc in enumerate(map(at, files)):
        if loc.local:
            local.append(Path(loc.path))
            continue
        copy = folder / f"{name}-{i:05d}.parquet"
        with loc.open_input() as source:
            # buffered reads: a row group written by another tool may hold a million rows
            reader = pq.ParquetFile(source, buffer_size=1 << 20)
            present = [c for c in columns if c in reader.schema_arrow.names]
            with pq.ParquetWriter(copy, pa.schema([reader.schema_arrow.field(c) for c in present])) as out:
                for batch in reader.iter_batches(batch_size=COPY_BATCH, columns=present):
                    out.write_batch(batch)
        local.append(copy)
    return local


def describe_plan(workdir: Where, views: dict[str, str], limit: int | None, retry_errors: bool) -> DescribePlan:
    """Plan a describe run: views maps each view name (in order) to its fingerprint."""
    workdir = at(workdir)
    manifest = validated(workdir / store.MANIFEST_DIR, schemas.MANIFEST)
    if not manifest:
        raise store.StageInputError(f"{workdir} has no manifest: run `leccr-pipe describe --input FOLDER` "
                                    f"(or `leccr-pipe ingest`) first")
    done_files = validated(workdir / store.DESCRIPTIONS_DIR, schemas.DESCRIPTIONS)
    with planning() as (con, folder):
        manifest = local_files(manifest, ["item_id", "media_type", "root", "relpath", "error_kind", "error"],
                               folder, "manifest")
        done_files = local_files(done_files, DONE_COLUMNS, folder, "done")
        con.execute("CREATE TEMP TABLE views (view VARCHAR, fingerprint VARCHAR, ord INTEGER)")
        con.executemany("INSERT INTO views VALUES (?, ?, ?)", [(v, fp, i) for i, (v, fp) in enumerate(views.items())])
        con.execute(f"CREATE TEMP VIEW manifest AS SELECT item_id, media_type, root, relpath, error_kind, error "
                    f"FROM read_parquet({paths_sql(manifest)}, union_by_name = true)")
        if limit is not None:   # the first N items by id: O(N), which the user chose
            con.execute(f"CREATE TEMP TABLE limited AS SELECT * FROM manifest ORDER BY item_id LIMIT {int(limit)}")
        source = "limited" if limit is not None else "manifest"
        items_total = con.sql("SELECT count(*) FROM manifest").fetchall()[0][0]
        items = con.sql(f"SELECT count(*) FROM {source}").fetchall()[0][0]
        # sized by keys, not items: five views make five keys per item (and 5x the memory)
        partitions = max(1, math.ceil(items * len(views) / PARTITION_KEYS))
        plan = DescribePlan(folder, items_total)
        items_in = split_by_hash(con, f"SELECT * FROM {source}", "item_id", partitions, folder / "items")
        done_rows = done_rows_sql(done_files, ["item_id", "view"],
                                  "(view, fingerprint) IN (SELECT (view, fingerprint) FROM views)")
        done_in = split_by_hash(con, done_rows, "item_id", partitions, folder / "done-rows")
        for part in range(partitions):
            _plan_partition(con, items_in[part], done_in[part], part, retry_errors, plan)
        for name in ("items", "done-rows"):   # read: only the shards stay
            shutil.rmtree(folder / name, ignore_errors=True)
        return plan


def _plan_partition(con, items: str, done_rows: str, part: int, retry_errors: bool, plan: DescribePlan) -> None:
    """One hash partition of the items (and of their done rows): its keys with their state,
    then its plan shards."""
    # the latest attempt of each key decides
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE keys AS
        WITH m AS (SELECT * FROM {items}), l AS ({latest_sql(done_rows, ["item_id", "view"])})
        SELECT m.*, v.view, v.ord, coalesce(l.attempts, 0) AS attempts,
               l.item_id IS NOT NULL AND NOT ({still_failed_sql("l.last_error", retry_errors)}) AS done
        FROM m CROSS JOIN views v LEFT JOIN l ON l.item_id = m.item_id AND l.view = v.view""")
    counts = con.sql("SELECT count_if(done), count_if(NOT done), count_if(NOT done AND attempts > 0), "
                         "count_if(NOT done AND error_kind IS NULL) FROM keys").fetchall()[0]
    done, todo, retried, engine = (n or 0 for n in counts)
    plan.rows_done, plan.rows_todo = plan.rows_done + done, plan.rows_todo + todo
    plan.rows_retried, plan.engine_rows = plan.rows_retried + retried, plan.engine_rows + engine
    for shards, which, name in ((plan.todo, "error_kind IS NULL", "todo"),
                                (plan.ingest_errors, "error_kind IS NOT NULL", "ingest-errors")):
        path = plan.folder / f"{name}-{part:05d}.parquet"
        con.execute(f"""
            COPY (SELECT item_id, any_value(media_type) AS media_type, any_value(root) AS root,
                         any_value(relpath) AS relpath, any_value(error_kind) AS error_kind, any_value(error) AS error,
                         string_agg(view, ',' ORDER BY ord) AS views, list(attempts ORDER BY ord) AS attempts
                  FROM keys WHERE NOT done AND {which} GROUP BY item_id ORDER BY item_id)
            TO '{path}' (FORMAT parquet)""")
        shards.add(path)


def validated(folder: Where, schema: pa.Schema) -> list[Loc]:
    """The folder's Parquet files, each checked against the contract (footers only)."""
    files = store.parquet_files(folder)
    for path in files:
        schemas.validate(store.read_schema(path), schema, where=str(path))
    return files


def paths_sql(files: list[Path]) -> str:
    return "[" + ", ".join(sql_str(str(p)) for p in files) + "]"


def sql_list(values) -> str:
    return ", ".join(sql_str(v) for v in sorted(values))


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"

