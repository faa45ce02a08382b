"""The working folder and its Parquet files: atomic writes, validated reads, one writer.

Layout (design.md): workdir/manifest, workdir/captions, workdir/descriptions, ... Each stage
writes files under deterministic names, whole (pipelines/storage.py: locally a temp name then
a rename, in object storage one PUT), so a killed run leaves either a whole file or none;
readers ignore temp files. The workdir may be local or in object storage (s3://...).
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipelines.storage import Loc, Where, at

MANIFEST_DIR = "manifest"
CAPTIONS_DIR = "captions"
DESCRIPTIONS_DIR = "descriptions"
ROW_GROUP = 65_536


class StageInputError(RuntimeError):
    """The whole input of a stage is unusable (the CLI turns this into exit code 2)."""


def write_atomic(table: pa.Table, path: Where) -> None:
    """Write a Parquet file whole: serialised in memory first (a failure uploads nothing), then
    written at once (Loc.write_bytes). In a leased workdir the lease must still be held."""
    from pipelines import lease
    target = at(path)
    if not target.local:
        lease.check_writes(target)
    buffer = pa.BufferOutputStream()
    # row groups of ROW_GROUP rows: readers that stream a file (plan.local_files) hold one at a time
    pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP)
    target.write_bytes(buffer.getvalue())   # the Buffer itself: no copy of the file into bytes


def parquet_files(folder: Where) -> list[Loc]:
    return at(folder).files("*.parquet")


def read_schema(path: Where) -> pa.Schema:
    loc = at(path)
    return pq.read_schema(loc.path, filesystem=loc.fs)


def read_table(path: Where, columns: list[str] | None = None) -> pa.Table:
    loc = at(path)
    return pq.read_table(loc.path, columns=columns, filesystem=loc.fs)


def read_folder(folder: Where, schema: pa.Schema, columns: list[str] | None = None,
                all_attempts: bool = False) -> pa.Table:
    """Read every Parquet file of a folder, each validated against `schema`. A key written more
    than once (a rerun retried its failed row) is seen once: its latest attempt
    (`latest_attempts`), unless `all_attempts`."""
    wanted = columns or schema.names
    keys = [] if all_attempts else list(schemas.KEYS.get(schemas.name_of(schema), ()))
    read = list(dict.fromkeys([*wanted, *keys, *(["attempt", "created_at"] if keys else [])]))
    target = pa.schema([schema.field(c) for c in read])
    tables = []
    for path in parquet_files(folder):
        file_schema = read_schema(path)
        schemas.validate(file_schema, schema, where=str(path))
        present = [c for c in read if c in file_schema.names]
        tables.append(schemas.conform(read_table(path, columns=present), target, where=str(path)))
    table = pa.concat_tables(tables) if tables else target.empty_table()
    if keys:
        table = latest_attempts(table, keys)
    return table.select(wanted).cast(schema if columns is None else pa.schema([schema.field(c) for c in columns]))


def latest_attempts(table: pa.Table, keys: list[str]) -> pa.Table:
    """One row per key: the one with the highest `attempt` (null counts as 1; a tie, which only
    hand-copied files make, goes to the later `created_at`). THE rule for every reader of a
    stage's output; the rows keep their order."""
    import pyarrow.compute as pc
    attempts = pc.fill_null(table.column("attempt"), 1)
    if table.num_rows == 0 or pc.max(attempts).as_py() <= 1:
        return table   # nothing was ever retried: every key has one row
    ranked = pa.table({**{k: table.column(k) for k in keys}, "attempt": attempts,
                       "created_at": table.column("created_at"), "position": pa.array(range(table.num_rows))})
    ranked = ranked.sort_by([("attempt", "ascending"), ("created_at", "ascending"), ("position", "ascending")])
    ranked = ranked.append_column("rank", pa.array(range(ranked.num_rows)))
    last = ranked.group_by(keys).aggregate([("rank", "max")]).column("rank_max")
    winners = ranked.column("position").take(last)
    return table.take(winners.take(pc.sort_indices(winners)))   # in their original order


def remove_temp_files(folder: Where) -> int:
    """Remove temp files left by a killed local writer (object storage has none); returns how many."""
    removed, folder = 0, at(folder)
    if folder.local and folder.is_dir():
        for tmp in Path(folder.path).glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def exclusive(workdir: Where, stage: str) -> Iterator[None]:
    """One writer per stage and workdir: two concurrent runs would duplicate rows. Locally an
    flock (the kernel drops it when the process dies); in object storage a lease object
    (pipelines/lease.py)."""
    workdir = at(workdir)
    if not workdir.local:
        from pipelines import lease
        held = lease.hold(workdir, stage)
        try:
            yield
        finally:
            lease.give_back(held)
        return
    Path(workdir.path).mkdir(parents=True, exist_ok=True)
    lock_path = Path(workdir.path) / f".{stage}.lock"
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageInputError(f"another `{stage}` run holds {lock_path}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
