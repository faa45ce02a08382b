"""What every benchmark reader shares: the config, the collector that turns native ids into
manifest/caption rows, the media index, tolerant file helpers, and the one writer.

A reader module (multi30k.py, vatex.py, ...) only parses its format and calls
`Collector.item(...)` / `Collector.caption(...)`; ids, path confinement, error rows, split
normalisation, duplicate handling and the Parquet writing all live here, so every format
behaves the same way.

Policies (the same for every format):
- item_id = ids.item_id(dataset, "<namespace>:<native id>"). The namespace names the *media
  collection* (flickr30k, coco, vatex, msrvtt), not the caption set, so Multi30K and the
  Flickr30K token file, or STAIR and COCO-CN (and `leccr-pipe ingest` of COCO, which uses
  "coco:<image id>" too), give the same image the same id when the dataset name matches.
- caption_id = ids.caption_id(item_id, lang, native caption key) (the annotation's own id, or
  its index in the file / within the item, as each reader documents).
- A caption whose media file is missing is KEPT; its item gets a manifest row with
  error_kind "not_found" (later stages skip error items). The report counts both.
- Media paths are confined to the media root (symlinks and `..` resolved) by
  pipelines.media.resolve_inside_root; an escaping path is an "outside_root" error row.
- Unusable input (no annotation file of the format, malformed JSON, misaligned Multi30K files,
  non-UTF-8 text, a language the format does not have) raises StageInputError (CLI exit 2).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from pipelines import ids, store
from pipelines.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, MediaError, resolve_inside_root

StageInputError = store.StageInputError

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def normalize_split(name: str | None) -> str | None:
    """train/val/test from the names datasets use (validate, validation, dev, ...)."""
    if name is None:
        return None
    key = str(name).strip().lower()
    return _SPLIT_ALIASES.get(key, key or None)


@dataclass(frozen=True)
class ImportConfig:
    format: str
    input: Path                           # the folder holding the benchmark's annotation files
    workdir: Path
    media_root: Path | None = None        # images/videos folder (default: --input)
    langs: tuple[str, ...] = ()           # empty: every language the format has (and the input holds)
    dataset: str | None = None            # item-id namespace (default: the format's media collection)
    split_ids: tuple[tuple[str, Path], ...] = ()   # (split, file of native ids, one a line): override


@dataclass
class ImportReport:
    format: str
    dataset: str
    media_root: str
    annotation_files: list[str] = field(default_factory=list)
    items: int = 0
    item_errors: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)            # items per split ("none" = null)
    captions: dict[str, int] = field(default_factory=dict)          # per language
    captions_of_error_items: int = 0      # kept, but their item has an error (e.g. media not found)
    skipped: dict[str, int] = field(default_factory=dict)           # annotation entries not imported, by reason
    notes: list[str] = field(default_factory=list)
    files_written: list[str] = field(default_factory=list)
    manifest_rows: int = 0                # rows in the merged workdir manifest


# ----------------------------------------------------------------------------- files


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (a BOM is dropped; `.gz` is decompressed). Non-UTF-8 is an
    input error rather than silently replaced characters (a GBK file would become noise)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as err:
        raise StageInputError(f"cannot read {path}: {err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise StageInputError(f"{path} is not UTF-8 text ({err}); convert it first (e.g. iconv -f GBK -t UTF-8)") \
            from None


def read_lines(path: Path) -> list[str]:
    """Lines without their line ends; one trailing empty line (a final newline) is not a line."""
    return read_text(path).splitlines()


def read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise StageInputError(f"{path} is not valid JSON: {err}") from None


def find_files(root: Path, pattern: re.Pattern) -> list[tuple[re.Match, Path]]:
    """Files under root (recursive, symlinked folders not followed) whose *name* matches
    `pattern`, shallowest first, then by path: a deterministic order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            match = pattern.match(name)
            if match:
                path = Path(dirpath) / name
                found.append((len(path.relative_to(root).parts), str(path), match, path))
    found.sort(key=lambda t: (t[0], t[1]))
    return [(m, p) for _, _, m, p in found]


def pick_one(candidates: list[tuple[re.Match, Path]], key, notes: list[str], root: Path,
             prefer=lambda path: 0) -> dict:
    """Group matches by key(match) and keep one file per key: the lowest prefer(path), then the
    shallowest. Dropped duplicates are noted so that the choice is never silent."""
    chosen: dict = {}
    for match, path in sorted(candidates, key=lambda mp: prefer(mp[1])):   # stable: keeps depth order
        k = key(match)
        if k in chosen:
            notes.append(f"ignored {path.relative_to(root)}: {chosen[k].relative_to(root)} is used for {k}")
            continue
        chosen[k] = path
    return chosen


# ----------------------------------------------------------------------------- media index


class MediaIndex:
    """Every image/video file under the media root, found by base name or by stem.

    Built once, lazily, by a walk that does not follow symlinked folders. When one name exists
    twice (a nested copy), the shallowest path wins, then the first in sorted order, and a note
    says so. Entries are only candidates: `Collector` still confines each one to the root.
    """

    def __init__(self, root: Path, media_type: str):
        self.root = root
        self.extensions = IMAGE_EXTENSIONS if media_type == "image" else VIDEO_EXTENSIONS
        self._by_name: dict[str, str] | None = None
        self._by_stem: dict[str, str] = {}
        self.duplicates = 0
        self.files = 0

    def _build(self) -> None:
        self._by_name = {}
        if not self.root.is_dir():
            return
        entries = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in filenames:
                stem, ext = os.path.splitext(name)
                if ext.lower() in self.extensions:
                    rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                    entries.append((rel.count(os.sep), rel, name, stem))
        entries.sort()
        for _, rel, name, stem in entries:
            self.files += 1
            if name in self._by_name:
                self.duplicates += 1
                continue
            self._by_name[name] = rel
            self._by_stem.setdefault(stem, rel)

    def by_name(self, name: str) -> str | None:
        if self._by_name is None:
            self._build()
        return self._by_name.get(name)

    def by_stem(self, stem: str) -> str | None:
        if self._by_name is None:
            self._build()
        return self._by_stem.get(stem)


# ----------------------------------------------------------------------------- collector


class Collector:
    """Accumulates manifest and caption rows for one import."""

    def __init__(self, dataset: str, namespace: str, media_type: str, media_root: Path, langs: tuple[str, ...]):
        self.dataset = dataset
        self.namespace = namespace
        self.media_type = media_type
        self.root = media_root
        self.langs = langs
        self.index = MediaIndex(media_root, media_type)
        self.items: dict[str, dict] = {}          # item_id -> manifest row
        self.by_native: dict[str, str] = {}       # native id -> item_id
        self.captions: dict[str, dict] = {}       # caption_id -> caption row
        self.skipped: Counter = Counter()
        self.notes: list[str] = []
        self.annotation_files: list[Path] = []

    def item_id_of(self, native_id: str) -> str:
        return ids.item_id(self.dataset, f"{self.namespace}:{native_id}")

    def item(self, native_id: str, split: str | None, names: Iterable[str] = (), stem: str | None = None) -> str:
        """The item of a native id, created on first sight. Its media file is found by the
        first of `names` (base names looked up anywhere under the root; a name with a folder
        part is taken relative to the root) that exists, else by `stem` (any extension of
        the format's media type). Seen again with another split: the first split stays."""
        native_id = str(native_id)
        split = normalize_split(split)
        item = self.by_native.get(native_id)
        if item is not None:
            row = self.items[item]
            if split and row["split"] is None:
                row["split"] = split
            elif split and row["split"] != split:
                self.skipped["split_conflict"] += 1
                if self.skipped["split_conflict"] <= 5:      # a few examples; the count is in `skipped`
                    self.notes.append(f"{self.namespace}:{native_id} is listed in both {row['split']} and "
                                      f"{split}; kept {row['split']}")
            return item
        item = self.item_id_of(native_id)
        relpath, kind, error, size = self._locate(native_id, list(names), stem)
        self.items[item] = {"item_id": item, "dataset": self.dataset, "split": split, "media_type": self.media_type,
                            "root": str(self.root), "relpath": relpath, "source_id": native_id, "size_bytes": size,
                            "error_kind": kind, "error": error}
        self.by_native[native_id] = item
        return item

    def _locate(self, native_id: str, names: list[str], stem: str | None):
        for name in names:
            if "/" in name or "\\" in name or name.startswith(".") or os.path.isabs(name):
                # a path, not a bare name: relative to the root and confined to it
                try:
                    path = resolve_inside_root(self.root, name)
                except MediaError as err:
                    if err.kind == "outside_root":
                        return None, err.kind, str(err), None
                    continue
                return os.path.relpath(path, os.path.realpath(self.root)), None, None, path.stat().st_size
            rel = self.index.by_name(name)
            if rel is not None:
                return self._confine(rel)
        if stem is not None:
            rel = self.index.by_stem(stem)
            if rel is not None:
                return self._confine(rel)
        wanted = " or ".join(names) if names else f"{stem}.<{'|'.join(sorted(e[1:] for e in self.index.extensions))}>"
        return None, "not_found", f"{self.namespace} {native_id}: no file {wanted} under {self.root}", None

    def _confine(self, rel: str):
        try:
            path = resolve_inside_root(self.root, rel)
        except MediaError as err:     # e.g. a symlinked file pointing outside the root
            return rel, err.kind, str(err), None
        return rel, None, None, path.stat().st_size

    def caption(self, item: str, lang: str, key: str, text: object) -> None:
        if not isinstance(text, str):
            self.skipped["bad_caption"] += 1
            return
        text = " ".join(text.split())     # one line, single spaces (captions come with \n, tabs, ...)
        if not text:
            self.skipped["empty_caption"] += 1
            return
        cid = ids.caption_id(item, lang, str(key))
        if cid in self.captions:
            self.skipped["duplicate_caption"] += 1
            return
        self.captions[cid] = {"caption_id": cid, "item_id": item, "split": None, "lang": lang, "text": text,
                              "origin": "human"}


# ----------------------------------------------------------------------------- writer


def load_split_ids(pairs: tuple[tuple[str, Path], ...], native_id) -> dict[str, str]:
    """{native id: split} from `--split-ids SPLIT=FILE` files (one native id a line)."""
    out: dict[str, str] = {}
    for split, path in pairs:
        if not Path(path).is_file():
            raise StageInputError(f"--split-ids {split}={path}: no such file")
        for line in read_lines(Path(path)):
            if line.strip():
                out[native_id(line.strip())] = normalize_split(split)
    return out


def write_import(cfg: ImportConfig, col: Collector, split_override: dict[str, str]) -> ImportReport:
    """Write captions/human-<lang>-<format>.parquet per language and merge the items into
    manifest/manifest.parquet. Rows are sorted by id, so the same input gives the same files."""
    if not col.items:
        raise StageInputError(f"{cfg.format}: the annotation files under {cfg.input} name no item")
    unknown = 0
    for native, split in split_override.items():
        item = col.by_native.get(native)
        if item is None:
            unknown += 1
        else:
            col.items[item]["split"] = split
    if unknown:
        col.notes.append(f"--split-ids: {unknown} listed id(s) are not in the annotations (ignored)")

    workdir = cfg.workdir
    manifest_path = workdir / store.MANIFEST_DIR / "manifest.parquet"
    report = ImportReport(format=cfg.format, dataset=col.dataset, media_root=str(col.root),
                          annotation_files=[str(p) for p in col.annotation_files])
    with store.exclusive(workdir, "manifest"):
        merged = _merge_manifest(manifest_path, col.items)
        split_of = {r["item_id"]: r["split"] for r in merged}
        errors = {r["item_id"] for r in merged if r["error_kind"]}
        by_lang: dict[str, list[dict]] = {}
        for row in col.captions.values():
            row["split"] = split_of[row["item_id"]]      # a caption's split is its item's
            by_lang.setdefault(row["lang"], []).append(row)
            report.captions_of_error_items += row["item_id"] in errors
        for lang in sorted(by_lang):
            rows = sorted(by_lang[lang], key=lambda r: r["caption_id"])
            path = workdir / store.CAPTIONS_DIR / f"human-{lang}-{cfg.format}.parquet"
            store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.CAPTIONS), path)
            report.files_written.append(str(path))
            report.captions[lang] = len(rows)
        store.write_atomic(pa.Table.from_pylist(merged, schema=schemas.MANIFEST), manifest_path)
        report.files_written.append(str(manifest_path))
    report.items = len(col.items)
    report.manifest_rows = len(merged)
    for row in col.items.values():
        if row["error_kind"]:
            report.item_errors[row["error_kind"]] = report.item_errors.get(row["error_kind"], 0) + 1
        split = split_of[row["item_id"]] or "none"
        report.splits[split] = report.splits.get(split, 0) + 1
    report.item_errors = dict(sorted(report.item_errors.items()))
    report.splits = dict(sorted(report.splits.items()))
    report.skipped = dict(sorted(col.skipped.items()))
    if col.index.duplicates:
        col.notes.append(f"{col.index.duplicates} media file name(s) occur more than once under {col.root}; "
                         f"the shallowest copy is used")
    if col.index.files == 0 and report.item_errors.get("not_found"):
        col.notes.append(f"no {col.media_type} files at all under {col.root}: wrong --media-root?")
    report.notes = col.notes
    return report


def _merge_manifest(path: Path, new_items: dict[str, dict]) -> list[dict]:
    """Existing manifest rows + this import's rows, sorted by item_id. A new row replaces an old
    one with the same id, except that a new error row never replaces a working old row, and a
    null split keeps the old row's split (the Flickr30K token file has no splits; Multi30K does)."""
    rows: dict[str, dict] = {}
    if path.is_file():
        try:
            table = schemas.conform(pq.read_table(path), schemas.MANIFEST, where=str(path))
        except (schemas.SchemaError, pa.ArrowInvalid, OSError) as err:
            raise StageInputError(f"existing manifest {path} is unusable: {err}") from None
        rows = {r["item_id"]: r for r in table.to_pylist()}
    for item, row in new_items.items():
        old = rows.get(item)
        if old is not None and old["error_kind"] is None and row["error_kind"] is not None:
            if old["split"] is None and row["split"] is not None:
                old["split"] = row["split"]
            continue
        if old is not None and row["split"] is None:
            row = {**row, "split": old["split"]}
        rows[item] = row
    return [rows[k] for k in sorted(rows)]


def check_langs(fmt: str, offered: tuple[str, ...], requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested languages (all offered when none were asked for); one the format does not
    have is an input error."""
    unknown = [lang for lang in requested if lang not in offered]
    if unknown:
        raise StageInputError(f"--format {fmt} has captions in {', '.join(offered)}; not in {', '.join(unknown)}")
    return requested or offered
