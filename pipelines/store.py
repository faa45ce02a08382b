"""The working folder and its Parquet files: atomic writes, validated reads, one writer.

Layout (design.md): workdir/manifest, workdir/captions, workdir/descriptions, ... Each stage
writes files under deterministic names, to a temp name first and then renamed, so a killed
run leaves either a whole file or none; readers ignore temp files.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import schemas

MANIFEST_DIR = "manifest"
CAPTIONS_DIR = "captions"
DESCRIPTIONS_DIR = "descriptions"


class StageInputError(RuntimeError):
    """The whole input of a stage is unusable (the CLI turns this into exit code 2)."""


def write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    # fsync so that a rename that survives a crash never points at a half-written file
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def parquet_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def read_folder(folder: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read every Parquet file of a folder, each validated against `schema`."""
    tables = []
    for path in parquet_files(folder):
        file_schema = pq.read_schema(path)
        schemas.validate(file_schema, schema, where=str(path))
        table = pq.read_table(path, columns=columns or schema.names)
        tables.append(table.cast(schema if columns is None else pa.schema([schema.field(c) for c in columns])))
    if not tables:
        target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return target.empty_table()
    return pa.concat_tables(tables)


def remove_temp_files(folder: Path) -> int:
    """Remove temp files left by a killed writer; returns how many."""
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def exclusive(workdir: Path, stage: str) -> Iterator[None]:
    """One writer per stage and workdir: two concurrent runs would duplicate rows."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock_path = workdir / f".{stage}.lock"
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageInputError(f"another `{stage}` run holds {lock_path}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
