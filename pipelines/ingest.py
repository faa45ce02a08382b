"""Ingest: turn a folder of media (+ captions) into workdir/manifest and workdir/captions.

Two readers:
- COCO-style: a captions JSON (`{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`); file names are relative to a media root, and one that escapes it is an error row.
- any folder: every image/video below the root (recursive, symlinked folders not followed); an
  optional `name.txt` beside `name.jpg` holds its English captions, one per line.
The input, the media root and the workdir may be local or in object storage (s3://bucket/...,
pipelines/storage.py); the manifest stores each item's root as a local path or a URI.
Both write one manifest row per item, problems included (as error rows), and one caption row
per caption. Ingest is deterministic, so rewriting its output on every run is safe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

import schemas
from pipelines import ids, store
from pipelines.media import media_type_for
from pipelines.storage import Loc, Where, at


@dataclass(frozen=True)
class IngestConfig:
    input: Where                          # local paths or URIs (s3://bucket/prefix, ...)
    workdir: Where
    dataset: str | None = None            # default: the input folder's name
    annotations: list[Where] = field(default_factory=list)   # COCO captions JSON files
    media_root: Where | None = None       # where COCO file_names live; default: the input root,
                                          # or INPUT/<split> (COCO 2017: train2017/) when they are there
    lang: str = "en"                      # language of the human captions

    def __post_init__(self) -> None:
        for name in ("input", "workdir", "media_root"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _real(at(getattr(self, name))))
        object.__setattr__(self, "annotations", [at(a) for a in self.annotations])


@dataclass
class IngestReport:
    dataset: str
    reader: str
    items: int = 0
    item_errors: dict[str, int] = field(default_factory=dict)
    captions: int = 0
    skipped_entries: int = 0              # JSON entries that name no item (no id, unknown image_id, no caption)


def run(cfg: IngestConfig) -> IngestReport:
    root = cfg.input
    if not root.is_dir():
        raise store.StageInputError(f"input {root} is not a folder")
    dataset = cfg.dataset or root.name
    annotation_files = list(cfg.annotations) or (root / "annotations").files("captions*.json")
    if annotation_files:
        media_root = MediaRoot(cfg.media_root) if cfg.media_root else None
        items, captions, skipped = _read_coco(dataset, root, media_root, annotation_files, cfg.lang)
        reader = "coco"
    else:
        items, captions = _read_folder(dataset, MediaRoot(root), cfg.lang)
        skipped, reader = 0, "folder"
    if not items:
        raise store.StageInputError(f"no images or videos found under {root} "
                                    f"(looked for {', '.join(sorted(_known_extensions()))})")
    manifest = pa.Table.from_pylist(sorted(items, key=lambda r: r["item_id"]), schema=schemas.MANIFEST)
    caption_table = pa.Table.from_pylist(sorted(captions, key=lambda r: r["caption_id"]), schema=schemas.CAPTIONS)
    _check_unique(manifest, "item_id")
    _check_unique(caption_table, "caption_id")
    store.write_atomic(manifest, cfg.workdir / store.MANIFEST_DIR / "manifest.parquet")
    store.write_atomic(caption_table, cfg.workdir / store.CAPTIONS_DIR / f"human-{cfg.lang}.parquet")
    report = IngestReport(dataset=dataset, reader=reader, items=len(items), captions=len(captions),
                          skipped_entries=skipped)
    for row in items:
        if row["error_kind"]:
            report.item_errors[row["error_kind"]] = report.item_errors.get(row["error_kind"], 0) + 1
    return report


def _real(loc: Loc) -> Loc:
    # a local root is stored as its real path (symlinks resolved), as the media checks see it
    return at(Path(loc.path).resolve()) if loc.local else loc


class MediaRoot:
    """A folder that media paths are relative to. Checks that a path stays inside it and names
    a file; a root in object storage is listed once, instead of a request per file."""

    def __init__(self, loc: Loc):
        self.loc = loc
        self._sizes: dict[str, int] | None = None

    def listing(self) -> dict[str, int]:
        if self._sizes is None:
            self._sizes = self.loc.sizes()
        return self._sizes

    def files(self):
        return sorted(self.listing()) if not self.loc.local else self.loc.walk()

    def check(self, relpath: str) -> tuple[str | None, str | None, int | None]:
        """(error_kind, error, size) of a file named in the input (untrusted)."""
        from pipelines.media import MediaError, object_inside_root, resolve_inside_root
        try:
            if self.loc.local:   # symlinks and `..` included
                return None, None, resolve_inside_root(Path(self.loc.path), relpath).stat().st_size
            name = object_inside_root(self.loc, relpath).path[len(self.loc.path.rstrip("/")) + 1:]
            if name not in self.listing():
                raise MediaError("not_found", f"{relpath!r} does not exist under {self.loc.uri!r}")
            return None, None, self.listing()[name]
        except MediaError as err:
            return err.kind, str(err), None

    def sidecar_text(self, relpath: str) -> str | None:
        """The text of `name.txt` beside `name.jpg`, if there is one (never through a symlink)."""
        name = os.path.splitext(relpath)[0] + ".txt"
        if self.loc.local:
            path = Path(self.loc.path) / name
            ok = path.is_file() and not path.is_symlink()
            return path.read_text(encoding="utf-8", errors="replace") if ok else None
        if name not in self.listing():
            return None
        return (self.loc / name).read_bytes().decode("utf-8", errors="replace")


def _known_extensions() -> set[str]:
    from pipelines.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    return IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def _check_unique(table: pa.Table, column: str) -> None:
    values = table.column(column).to_pylist()
    if len(set(values)) != len(values):
        dupes = sorted({v for v in values if values.count(v) > 1})[:5]
        raise store.StageInputError(f"duplicate {column} values {dupes}: the input lists the same item twice")


def _item_row(dataset: str, root: MediaRoot, key: str, relpath: str | None, source_id: str | None,
              split: str | None, error_kind: str | None = None, error: str | None = None) -> dict:
    media_type = media_type_for(relpath) if relpath else None
    size = None
    if relpath is not None and error_kind is None:
        error_kind, error, size = root.check(relpath)
    if error_kind is None and media_type is None:
        error_kind, error = "unsupported_type", f"{relpath}: not a known image or video extension"
    return {"item_id": ids.item_id(dataset, key), "dataset": dataset, "split": split,
            "media_type": media_type, "root": root.loc.uri, "relpath": relpath, "source_id": source_id,
            "size_bytes": size, "error_kind": error_kind, "error": error}


def _readable_name(name: str) -> str | None:
    """The name as UTF-8 text, or None when the filesystem name is not valid UTF-8."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return None


def _read_folder(dataset: str, root: MediaRoot, lang: str) -> tuple[list[dict], list[dict]]:
    items, captions = [], []
    for rel in root.files():
        if media_type_for(rel) is None:
            continue
        readable = _readable_name(rel)
        if readable is None:
            shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
            items.append(_item_row(dataset, root, rel, None, None, None, "bad_filename",
                                   f"file name is not valid UTF-8: {shown!r}"))
            continue
        row = _item_row(dataset, root, readable, readable, None, None)
        items.append(row)
        captions.extend(_sidecar_captions(root, readable, row["item_id"], lang))
    return items, captions


def _sidecar_captions(root: MediaRoot, relpath: str, item: str, lang: str) -> list[dict]:
    text = root.sidecar_text(relpath)
    if text is None:
        return []
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    return [_caption_row(item, None, lang, str(i), text) for i, text in enumerate(texts)]


def _caption_row(item: str, split: str | None, lang: str, key: str, text: str) -> dict:
    return {"caption_id": ids.caption_id(item, lang, key), "item_id": item, "split": split,
            "lang": lang, "text": text, "origin": "human"}


def _split_from_name(path: Loc) -> str | None:
    # captions_train2017.json -> train2017; captions.json -> None
    stem = path.name.rsplit(".", 1)[0]
    return stem.split("_", 1)[1] if "_" in stem else None


def _load_coco_json(path: Loc) -> dict:
    if not path.is_file():
        raise store.StageInputError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise store.StageInputError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise store.StageInputError(f"annotation file {path} has no 'images' list (COCO captions format)")
    if not isinstance(data.get("annotations", []), list):
        raise store.StageInputError(f"annotation file {path}: 'annotations' must be a list")
    return data


def _guess_media_root(root: Loc, split: str | None, images: list) -> MediaRoot:
    """COCO keeps `file_name`s relative to a per-split folder (train2017/000000391895.jpg):
    use INPUT/<split> when the first listed files are there and not directly under INPUT."""
    names = [e["file_name"] for e in images[:5] if isinstance(e, dict) and isinstance(e.get("file_name"), str)]
    split_root = root / split if split else None
    if not names or split_root is None or not split_root.is_dir():
        return MediaRoot(root)
    direct = sum((root / n).is_file() for n in names)
    nested = sum((split_root / n).is_file() for n in names)
    return MediaRoot(_real(split_root) if nested > direct else root)


def _read_coco(dataset: str, input_root: Loc, media_root: MediaRoot | None, files: list[Loc],
               lang: str) -> tuple[list[dict], list[dict], int]:
    items: dict[str, dict] = {}
    captions: list[dict] = []
    skipped = 0
    for path in files:
        data = _load_coco_json(path)
        split = _split_from_name(path)
        root = media_root or _guess_media_root(input_root, split, data["images"])
        known: dict[str, str] = {}
        for entry in data["images"]:
            source_id, file_name = _coco_image_fields(entry)
            if source_id is None:
                skipped += 1
                continue
            key = f"coco:{source_id}"
            if file_name is None:
                row = _item_row(dataset, root, key, None, source_id, split, "bad_annotation",
                                f"{path.name}: image {source_id} has no string 'file_name'")
            else:
                row = _item_row(dataset, root, key, file_name, source_id, split)
            items.setdefault(row["item_id"], row)
            known[source_id] = row["item_id"]
        for ann in data.get("annotations", []):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
                skipped += 1
                continue
            item = known.get(str(ann.get("image_id")))
            if item is None:
                skipped += 1
                continue
            ann_key = str(ann.get("id", f"{ann.get('image_id')}:{len(captions)}"))
            captions.append(_caption_row(item, split, lang, ann_key, ann["caption"].strip()))
    return list(items.values()), captions, skipped


def _coco_image_fields(entry: object) -> tuple[str | None, str | None]:
    if not isinstance(entry, dict) or "id" not in entry:
        return None, None
    file_name = entry.get("file_name")
    return str(entry["id"]), file_name if isinstance(file_name, str) and file_name else None
