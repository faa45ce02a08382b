"""Exactly-once output for generating stages: rows are buffered and written in files named
after a hash of their row keys, atomically. A rerun plans only keys not done yet, so a killed
run loses at most the rows still in memory. A key whose row failed (transiently, or any error
with --retry-errors) is planned again and its new row is written with the next `attempt`;
readers see the latest attempt only (store.read_folder), so each key counts once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa

from pipelines import failures, ids, store


class KeyedWriter:
    def __init__(self, folder: Path, schema: pa.Schema, key: Callable[[dict], str], rows_per_file: int,
                 prefix: str = "part"):
        self.folder, self.schema, self.key, self.rows_per_file, self.prefix = folder, schema, key, rows_per_file, prefix
        self.buffer: list[dict] = []
        self.rows_written = 0

    def add(self, rows: Iterable[dict]) -> None:
        self.buffer.extend(rows)
        if len(self.buffer) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_pylist(self.buffer, schema=self.schema)
        name = f"{self.prefix}-{ids.content_key([self.key(r) for r in self.buffer])}.parquet"
        store.write_atomic(table, self.folder / name)
        self.rows_written += len(self.buffer)
        self.buffer = []


@dataclass
class Written:
    """What a stage's output folder already holds, by key (the latest attempt of each)."""
    done: set[tuple]              # keys a rerun skips
    attempts: dict[tuple, int]    # key -> attempts so far (every key written, done or not)

    def next_attempt(self, key: tuple) -> int:
        return self.attempts.get(key, 0) + 1


def written_keys(folder: Path, schema: pa.Schema, columns: list[str], retry_errors: bool = False) -> Written:
    """The key tuples (of `columns`) already written, and which of them are done: a success, or
    a permanent error unless `retry_errors` (pipelines.failures)."""
    table = store.read_folder(folder, schema, columns=[*columns, "attempt", "error_kind"])
    keys = zip(*(table.column(c).to_pylist() for c in columns))
    written = Written(set(), {})
    for key, attempt, kind in zip(keys, table.column("attempt").to_pylist(), table.column("error_kind").to_pylist()):
        written.attempts[key] = attempt or 1
        if failures.counts_as_done(kind, retry_errors):
            written.done.add(key)
    return written
