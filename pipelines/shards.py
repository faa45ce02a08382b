"""Exactly-once output for generating stages: rows are buffered and written in files named
after a hash of their row keys (and attempt), atomically. A rerun plans only keys not done yet
(pipelines/plan.py), so a killed run loses at most the rows still in memory. A key whose row
failed (transiently, or any error with --retry-errors) is planned again and its new row is
written with the next `attempt`; readers see the latest attempt only (store.read_folder), so
each key counts once."""

from __future__ import annotations

from typing import Callable, Iterable

import pyarrow as pa

from pipelines import ids, store
from pipelines.storage import Where, at


class KeyedWriter:
    def __init__(self, folder: Where, schema: pa.Schema, key: Callable[[dict], str], rows_per_file: int,
                 prefix: str = "part"):
        self.folder, self.schema, self.key, self.rows_per_file, self.prefix = at(folder), schema, key, rows_per_file, prefix
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
