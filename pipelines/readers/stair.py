"""STAIR Captions (Japanese captions of COCO 2014 images) + COCO images.

Accepted files (found by name anywhere under --input): `stair_captions_v<version>_train.json`
and `..._val.json`; the `_tokenized` variants are read the same way (their `caption` field is
the plain text) and are only used for a split that has no untokenized file. Format: COCO
captions JSON, `{"images": [{"id", "file_name"?}], "annotations": [{"id"?, "image_id",
"caption"}]}`. Split: train / val from the file name (`--split-ids` overrides, e.g. for a
Karpathy-style test split).

Images: COCO images anywhere under the media root, by the annotation's `file_name`, else by
the 2014 names `COCO_train2014_%012d.jpg` / `COCO_val2014_%012d.jpg`, else the 2017 name
`%012d.jpg`. Item key "coco:<image id>"; caption key: the annotation's `id` (else
"<image_id>:<position in the file>").
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.readers import _coco
from pipelines.readers.common import Collector, StageInputError, find_files, pick_one, read_json

MEDIA = "image"
NAMESPACE = _coco.NAMESPACE
LANGS = ("ja",)
native_id = _coco.native_id

_FILES = re.compile(r"^stair_captions_v[\d.]+_(train|val)(_tokenized)?\.json$", re.IGNORECASE)


def read(root: Path, col: Collector, explicit_langs: bool) -> None:
    found = find_files(root, _FILES)
    if not found:
        raise StageInputError(f"stair: no stair_captions_v*_train.json / _val.json under {root}")
    chosen = pick_one(found, lambda m: m.group(1).lower(), col.notes, root,
                      prefer=lambda p: "_tokenized" in p.name.lower())
    for split in sorted(chosen, key=lambda s: (s != "train", s)):
        path = chosen[split]
        col.annotation_files.append(path)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations", []), list):
            raise StageInputError(f"stair: {path} is not a COCO captions JSON (needs 'images' and 'annotations' lists)")
        known: dict[str, str] = {}
        for entry in data["images"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), (int, str)) \
                    or not str(entry["id"]).strip().isdigit():
                col.skipped["bad_entry"] += 1
                continue
            image_id = str(int(entry["id"]))
            given = entry.get("file_name") if isinstance(entry.get("file_name"), str) else None
            folder = (_coco.parse_image_id(Path(given).stem) or (None, None))[1] if given else None
            known[image_id] = col.item(image_id, split, names=_coco.file_names(image_id, folder, given))
        for position, ann in enumerate(data.get("annotations", [])):
            if not isinstance(ann, dict):
                col.skipped["bad_entry"] += 1
                continue
            item = known.get(str(ann.get("image_id")))
            if item is None:
                col.skipped["unknown_item"] += 1
                continue
            key = str(ann["id"]) if isinstance(ann.get("id"), (int, str)) else f"{ann['image_id']}:{position}"
            col.caption(item, "ja", key, ann.get("caption"))
