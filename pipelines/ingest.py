"""Ingest: turn a folder of media (+ captions) into workdir/manifest and workdir/captions.

Two readers:
- COCO-style: a captions JSON (`{"images": [{"id", "file_name"}], "annotations": [{"image_id",
  "caption"}]}`); file names are relative to a media root, and one that escapes it is an error row.
- any folder: every image/video below the root (recursive, symlinked folders not followed); an
  optional `name.txt` beside `name.jpg` holds its English captions, one per line.
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


@dataclass(frozen=True)
class IngestConfig:
    input: Path
    workdir: Path
    dataset: str | None = None            # default: the input folder's name
    annotations: list[Path] = field(default_factory=list)   # COCO captions JSON files
    media_root: Path | None = None        # where COCO file_names live; default: the input root,
                                          # or INPUT/<split> (COCO 2017: train2017/) when they are there
    lang: str = "en"                      # language of the human captions


@dataclass
class IngestReport:
    dataset: str
    reader: str
    items: int = 0
    item_errors: dict[str, int] = field(default_factory=dict)
    captions: int = 0
    skipped_entries: int = 0              # JSON entries that name no item (no id, unknown image_id, no caption)


def run(cfg: IngestConfig) -> IngestReport:
    root = cfg.input.expanduser()
    if not root.is_dir():
        raise store.StageInputError(f"input {root} is not a folder")
    dataset = cfg.dataset or root.resolve().name
    annotation_files = list(cfg.annotations) or sorted((root / "annotations").glob("captions*.json"))
    if annotation_files:
        media_root = cfg.media_root.resolve() if cfg.media_root else None
        items, captions, skipped = _read_coco(dataset, root.resolve(), media_root, annotation_files, cfg.lang)
        reader = "coco"
    else:
        items, captions = _read_folder(dataset, root.resolve(), cfg.lang)
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


def _known_extensions() -> set[str]:
    from pipelines.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    return IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


def _check_unique(table: pa.Table, column: str) -> None:
    values = table.column(column).to_pylist()
    if len(set(values)) != len(values):
        dupes = sorted({v for v in values if values.count(v) > 1})[:5]
        raise store.StageInputError(f"duplicate {column} values {dupes}: the input lists the same item twice")


def _item_row(dataset: str, root: Path, key: str, relpath: str | None, source_id: str | None,
              split: str | None, error_kind: str | None = None, error: str | None = None) -> dict:
    media_type = media_type_for(relpath) if relpath else None
    size = None
    if relpath is not None and error_kind is None:
        error_kind, error, size = _check_file(root, relpath)
    if error_kind is None and media_type is None:
        error_kind, error = "unsupported_type", f"{relpath}: not a known image or video extension"
    return {"item_id": ids.item_id(dataset, key), "dataset": dataset, "split": split,
            "media_type": media_type, "root": str(root), "relpath": relpath, "source_id": source_id,
            "size_bytes": size, "error_kind": error_kind, "error": error}


def _check_file(root: Path, relpath: str) -> tuple[str | None, str | None, int | None]:
    """Confine a path to the root (symlinks and `..` included) and check it exists."""
    from pipelines.media import MediaError, resolve_inside_root
    try:
        path = resolve_inside_root(root, relpath)
        return None, None, path.stat().st_size
    except MediaError as err:
        return err.kind, str(err), None


def _readable_name(name: str) -> str | None:
    """The name as UTF-8 text, or None when the filesystem name is not valid UTF-8."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return None


def _read_folder(dataset: str, root: Path, lang: str) -> tuple[list[dict], list[dict]]:
    items, captions = [], []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no escape via dir links
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if media_type_for(name) is None:
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


def _sidecar_captions(root: Path, relpath: str, item: str, lang: str) -> list[dict]:
    sidecar = (root / relpath).with_suffix(".txt")
    if not sidecar.is_file() or sidecar.is_symlink():
        return []
    lines = sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    return [_caption_row(item, None, lang, str(i), text) for i, text in enumerate(texts)]


def _caption_row(item: str, split: str | None, lang: str, key: str, text: str) -> dict:
    return {"caption_id": ids.caption_id(item, lang, key), "item_id": item, "split": split,
            "lang": lang, "text": text, "origin": "human"}


def _split_from_name(path: Path) -> str | None:
    # captions_train2017.json -> train2017; captions.json -> None
    stem = path.stem
    return stem.split("_", 1)[1] if "_" in stem else None


def _load_coco_json(path: Path) -> dict:
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


def _guess_media_root(root: Path, split: str | None, images: list) -> Path:
    """COCO keeps `file_name`s relative to a per-split folder (train2017/000000391895.jpg):
    use INPUT/<split> when the first listed files are there and not directly under INPUT."""
    names = [e["file_name"] for e in images[:5] if isinstance(e, dict) and isinstance(e.get("file_name"), str)]
    split_root = root / split if split else None
    if not names or split_root is None or not split_root.is_dir():
        return root
    direct = sum((root / n).is_file() for n in names)
    nested = sum((split_root / n).is_file() for n in names)
    return split_root.resolve() if nested > direct else root


def _read_coco(dataset: str, input_root: Path, media_root: Path | None, files: list[Path],
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
