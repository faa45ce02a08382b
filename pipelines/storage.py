"""Where files are: a local folder, or a folder in object storage (s3://, gs://, or any other
fsspec URI), behind one small type, `Loc`, that the stages use for their inputs, media and
workdir.

What object storage changes, and how the stages cope:
- No rename: a file is written whole, in one PUT (an object appears complete or not at all),
  so a killed writer leaves no half file and needs no temp name there. Locally a file is still
  written to a temp name, fsynced and renamed.
- No folders: a "folder" is a key prefix; listing it is a prefix listing.
- No locks: one writer per workdir comes from a lease object (pipelines/lease.py).
- Credentials come from each store's own SDK chain (environment, profile, instance role);
  nothing here reads or logs them. S3-compatible stores (MinIO, R2, an emulator) are reached
  with AWS_ENDPOINT_URL, as with the AWS SDKs.

A Loc pickles as its URI, so Ray workers open the store with their own credentials.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import threading
from pathlib import Path
from typing import Iterator, Union

# schemes pyarrow opens itself; any other scheme goes through fsspec
PYARROW_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}


class Loc:
    """A file or folder: local (`scheme` "") or in a store (`scheme` "s3", "gs", "memory", ...).
    `path` is what the store's filesystem calls it: an absolute path locally, "bucket/key" in
    S3 and GCS."""

    __slots__ = ("scheme", "path")

    def __init__(self, scheme: str, path: str):
        self.scheme, self.path = scheme, path

    # ------------------------------------------------------------------ names
    @property
    def local(self) -> bool:
        return not self.scheme

    @property
    def uri(self) -> str:
        return self.path if self.local else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Loc({self.uri!r})"

    def __fspath__(self) -> str:
        if not self.local:
            raise TypeError(f"{self.uri} is in object storage, not a local path")
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Loc) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __reduce__(self):
        return at, (self.uri,)

    def __truediv__(self, name: str) -> "Loc":
        return Loc(self.scheme, posixpath.join(self.path, name) if not self.local else os.path.join(self.path, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    # ------------------------------------------------------------------ the filesystem
    @property
    def fs(self):
        """The pyarrow filesystem that holds this location (pass `fs_path` to it)."""
        return _filesystem(self.scheme, self.path.split("/", 1)[0])

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        from pyarrow.fs import FileType
        return self._info().type != FileType.NotFound

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType
        return self._info().type == FileType.Directory

    def is_file(self) -> bool:
        from pyarrow.fs import FileType
        return self._info().type == FileType.File

    def files(self, pattern: str = "*") -> list["Loc"]:
        """The files directly in this folder whose names match `pattern`, sorted; hidden names
        (".x": temp files, leases) left out. A missing folder has none."""
        from pyarrow.fs import FileSelector, FileType
        if self.local:
            folder = Path(self.path)
            names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        else:
            infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))
            names = [posixpath.basename(i.path) for i in infos if i.type == FileType.File]
        return [self / n for n in sorted(names) if not n.startswith(".") and fnmatch.fnmatch(n, pattern)]

    def walk(self) -> Iterator[str]:
        """Every file below this folder, as a path relative to it, in sorted order. Locally,
        symlinked folders are not followed (no escape from the root through a folder link)."""
        if self.local:
            for dirpath, dirnames, filenames in os.walk(self.path):
                dirnames.sort()
                for name in sorted(filenames):
                    yield os.path.relpath(os.path.join(dirpath, name), self.path)
            return
        yield from sorted(self.sizes())

    def sizes(self) -> dict[str, int]:
        """{relative path: size} of every file below this folder, from one listing (in object
        storage a request per 1000 keys, instead of one per file)."""
        from pyarrow.fs import FileSelector, FileType
        infos = self.fs.get_file_info(FileSelector(self.path, recursive=True, allow_not_found=True))
        prefix = self.path.rstrip("/") + "/"
        return {i.path[len(prefix):]: i.size for i in infos if i.type == FileType.File}

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The whole file; with `limit`, at most limit + 1 bytes are read and a larger file is
        refused (memory stays bounded even when the object grew after a size check)."""
        with self.fs.open_input_stream(self.path) as stream:
            data = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise ValueError(f"{self.uri} is larger than {limit} bytes")
        return data

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def open_input(self):
        """A random-access file (what Parquet readers need)."""
        return self.fs.open_input_file(self.path)

    def open_lines(self):
        """A buffered binary stream: iterate it for lines (read a chunk at a time)."""
        import io
        if self.local:
            return open(self.path, "rb")
        return io.BufferedReader(self.fs.open_input_stream(self.path))

    def write_bytes(self, data) -> None:
        """Write the whole file (bytes or any buffer) so that readers see all of it or none of
        it: locally a temp name, fsync and rename; in a store one PUT (the object appears when
        it completes)."""
        if self.local:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as fh:
                fh.write(data)
                # fsync so that a rename that survives a crash never points at a half-written file
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def remove(self) -> None:
        self.fs.delete_file(self.path)

    def remove_tree(self) -> None:
        from pyarrow.fs import FileType
        kind = self._info().type
        if kind == FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == FileType.File:
            self.fs.delete_file(self.path)


Where = Union[str, os.PathLike, Loc]


def at(where: Where) -> Loc:
    """A Loc from a local path, a file:// URI or a store URI (s3://bucket/prefix, gs://...,
    memory://..., any scheme fsspec knows). Local paths are made absolute."""
    if isinstance(where, Loc):
        return where
    text = os.fspath(where)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() == "file" or "/" in scheme:
        local = rest if sep and scheme.lower() == "file" else text
        return Loc("", os.path.abspath(os.path.expanduser(local)))
    scheme = scheme.lower()
    if scheme in PYARROW_SCHEMES:
        return Loc(scheme, rest.strip("/"))
    # fsspec's own idea of the path (memory:// keeps a leading slash, for example)
    return Loc(scheme, _fsspec(scheme)._strip_protocol(text).rstrip("/") or "/")


def is_remote(where: Where | None) -> bool:
    return where is not None and not at(where).local


def is_uri(text: str) -> bool:
    """Whether a user's path names a store (s3://b/x, gs://..., memory://...): also when a
    `Path` has already folded it to "s3:/b/x", as typer's Path options do. file: is local."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", text)) and not text.lower().startswith("file:")


_filesystems: dict[tuple[str, str], object] = {}
_filesystems_lock = threading.Lock()


def reset_filesystems() -> None:
    """Forget the filesystems opened so far (a test that starts an endpoint of its own)."""
    with _filesystems_lock:
        _filesystems.clear()


def _filesystem(scheme: str, bucket: str):
    """One filesystem per (scheme, bucket) and process: they hold connection pools, and S3's
    resolves the bucket's region once."""
    from pyarrow import fs as pafs
    key = (scheme, bucket if scheme in PYARROW_SCHEMES else "")
    with _filesystems_lock:
        if key not in _filesystems:
            if not scheme:
                _filesystems[key] = pafs.LocalFileSystem()
            elif scheme in PYARROW_SCHEMES:
                _filesystems[key] = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
            else:
                _filesystems[key] = pafs.PyFileSystem(pafs.FSSpecHandler(_fsspec(scheme)))
        return _filesystems[key]


def _fsspec(scheme: str):
    try:
        import fsspec
        return fsspec.filesystem(scheme)
    except (ImportError, ValueError) as err:
        raise ValueError(f"no filesystem for {scheme}:// ({err}); s3:// and gs:// work out of the box, "
                         f"other schemes need fsspec and its plugin for them") from None
