"""Multi30K task 1 (the multilingual Flickr30K captions) + Flickr30K images.

Accepted layout (the `multi30k/dataset` repository's `data/task1/`, found anywhere under --input):
    raw/train.en  raw/train.de  raw/train.fr  raw/train.cs       one caption per line (.gz too)
    raw/val.<lang>  raw/test_2016_flickr.<lang>
    image_splits/train.txt  image_splits/val.txt  image_splits/test_2016_flickr.txt
                                                                 one Flickr30K file name per line
Line i of `<split>.<lang>` describes the image on line i of the split's image list; the list
may also be named `<split>.images` or `<split>_images.txt` (any folder). Splits: train -> train,
val -> val, test_2016_flickr -> test (the LECCR test set); other test sets (test_2017_*,
test_2018_*) are ignored with a note. A text file whose line count differs from its image list
is an input error (the alignment would be wrong).

Images: the listed file names (e.g. `1000092795.jpg`) are looked up by base name anywhere under
the media root (`flickr30k-images/`, `flickr30k_images/`, ...). Item key "flickr30k:<file stem>",
shared with the `flickr30k` format (the Flickr30K English captions: 5 per image, which the
LECCR recipe trains on). Caption key "<split>:<line index>"; the Multi30K captions are one per
image and language.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipelines.media import IMAGE_EXTENSIONS
from pipelines.readers.common import Collector, StageInputError, find_files, pick_one, read_lines

MEDIA = "image"
NAMESPACE = "flickr30k"
LANGS = ("en", "de", "fr", "cs")
SPLITS = {"train": "train", "val": "val", "test_2016_flickr": "test"}

_TEXT = re.compile(r"^(train|val|test_\d{4}_[a-z]+)\.([a-z]{2})(\.gz)?$")
_LIST = re.compile(r"^(train|val|test_\d{4}_[a-z]+)(\.images|_images\.txt|\.txt)(\.gz)?$")


def native_id(text: str) -> str:
    """`1000092795.jpg`, `flickr30k-images/1000092795.jpg` or `1000092795` -> "1000092795"."""
    base = text.strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMAGE_EXTENSIONS else base


def image_lists(root: Path, notes: list[str]) -> dict[str, Path]:
    """{native split name: image list file}. `<split>.txt` counts only inside image_splits/."""
    found = [(m, p) for m, p in find_files(root, _LIST)
             if m.group(2) != ".txt" or p.parent.name == "image_splits"]
    return pick_one(found, lambda m: m.group(1), notes, root, prefer=lambda p: p.name.endswith(".gz"))


def read_image_list(path: Path) -> list[str]:
    return [line.strip() for line in read_lines(path)]


def read(root: Path, col: Collector, explicit_langs: bool) -> None:
    notes = col.notes
    texts = [(m, p) for m, p in find_files(root, _TEXT) if m.group(2) in LANGS]
    chosen = pick_one(texts, lambda m: (m.group(1), m.group(2)), notes, root,
                      prefer=lambda p: p.name.endswith(".gz"))
    lists = image_lists(root, notes)
    ignored = sorted({s for s, _ in chosen} | set(lists))
    ignored = [s for s in ignored if s not in SPLITS]
    if ignored:
        notes.append(f"ignored split(s) {', '.join(ignored)}: the benchmark uses train, val and test_2016_flickr")
    chosen = {k: p for k, p in chosen.items() if k[0] in SPLITS}
    lists = {s: p for s, p in lists.items() if s in SPLITS}
    if not chosen and not lists:
        raise StageInputError(f"multi30k: no Multi30K task1 files under {root} (looked for "
                              f"<train|val|test_2016_flickr>.<{'|'.join(LANGS)}>[.gz] and image_splits/<split>.txt)")
    present = {lang for _, lang in chosen}
    missing = [lang for lang in col.langs if lang not in present]
    if explicit_langs and missing:
        raise StageInputError(f"multi30k: no caption files for {', '.join(missing)} under {root}")

    for split in SPLITS:                       # fixed order: train, val, test
        if split not in lists:
            if any(s == split for s, _ in chosen):
                raise StageInputError(f"multi30k: {split} captions found but no image list "
                                      f"(image_splits/{split}.txt or {split}.images) under {root}")
            continue
        col.annotation_files.append(lists[split])
        names = read_image_list(lists[split])
        items = []
        for name in names:
            if not name:
                items.append(None)
                col.skipped["bad_line"] += 1
                continue
            items.append(col.item(native_id(name), SPLITS[split], names=[name]))
        for lang in col.langs:
            path = chosen.get((split, lang))
            if path is None:
                continue
            col.annotation_files.append(path)
            lines = read_lines(path)
            if len(lines) != len(names):
                raise StageInputError(f"multi30k: {path} has {len(lines)} lines but its image list "
                                      f"{lists[split]} has {len(names)}: the files are not aligned")
            for i, (item, text) in enumerate(zip(items, lines)):
                if item is not None:
                    col.caption(item, lang, f"{split}:{i}", text)
