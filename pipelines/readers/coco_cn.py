"""COCO-CN (human-written Chinese captions of COCO images) + COCO images.

Supported variant: the COCO-CN release of 2018-05 (20,341 images, 18,341 / 1,000 / 1,000),
*human-written* sentences only. Files (found by name anywhere under --input):
- `imageid.human-written-caption.txt` (required): one caption per line,
  `<image id>#<n>\t<caption>`, where the image id is the COCO file stem
  (`COCO_val2014_000000000042`); `val2014_000000000042`, `000000000042` and `42` are accepted
  too. Without `#<n>` the caption's position within its image is its number.
- `coco-cn_train.txt`, `coco-cn_val.txt`, `coco-cn_test.txt` (optional): one image id per line,
  giving the splits. Images in no list get a null split (noted).
Not read: `imageid.manually-translated-caption.txt` (human translations of English captions,
test only), the machine-translated and tag files; a note says when they were seen.

Images: as stair.py (the id's 2014 folder gives the file name `COCO_val2014_%012d.jpg`; 2017
names are found too). Item key "coco:<image id>"; caption key "<n>".
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.readers import _coco
from pipelines.readers.common import Collector, StageInputError, find_files, pick_one, read_lines

MEDIA = "image"
NAMESPACE = _coco.NAMESPACE
LANGS = ("zh",)
native_id = _coco.native_id

_CAPTIONS = re.compile(r"^imageid\.human-written-caption\.txt$")
_LISTS = re.compile(r"^coco-cn_(train|val|test)\.txt$")
_NOT_READ = re.compile(r"^imageid\..*(translated|tag).*\.txt$")


def read(root: Path, col: Collector, explicit_langs: bool) -> None:
    found = find_files(root, _CAPTIONS)
    if not found:
        raise StageInputError(f"coco-cn: no imageid.human-written-caption.txt under {root}")
    path = found[0][1]
    for _, other in found[1:]:
        col.notes.append(f"ignored {other.relative_to(root)}: {path.relative_to(root)} is used")
    for _, other in find_files(root, _NOT_READ):
        col.notes.append(f"not read: {other.relative_to(root)} (only human-written captions are imported)")

    lists = pick_one(find_files(root, _LISTS), lambda m: m.group(1), col.notes, root)
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        if split not in lists:
            continue
        col.annotation_files.append(lists[split])
        for line in read_lines(lists[split]):
            parsed = _coco.parse_image_id(line) if line.strip() else None
            if parsed is None:
                col.skipped["bad_line"] += line.strip() != ""
                continue
            split_of.setdefault(parsed[0], split)
            col.item(parsed[0], split, names=_coco.file_names(*parsed))
    if not lists:
        col.notes.append("no coco-cn_<split>.txt lists found: splits are null")

    col.annotation_files.append(path)
    per_item: dict[str, int] = {}
    unlisted = 0
    for line in read_lines(path):
        if not line.strip():
            continue
        head, sep, text = line.partition("\t")
        image, hash_, n = head.strip().partition("#")
        parsed = _coco.parse_image_id(image) if sep else None
        if parsed is None:
            col.skipped["bad_line"] += 1
            continue
        image_id = parsed[0]
        if lists and image_id not in split_of:
            unlisted += 1
        item = col.item(image_id, split_of.get(image_id), names=_coco.file_names(*parsed))
        position = per_item.get(item, 0)
        per_item[item] = position + 1
        col.caption(item, "zh", n.strip() if hash_ else str(position), text)
    if unlisted:
        col.notes.append(f"{unlisted} caption(s) name images that are in no coco-cn_<split>.txt list (split null)")
