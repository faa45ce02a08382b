"""VATEX (English + Chinese captions of video clips) + a videos folder.

Accepted files (found by name anywhere under --input): `vatex_*.json`, each a list of
`{"videoID": "<youtube id>_<start>_<end>", "enCap": [10 str], "chCap": [10 str]}` (either list
may be absent, e.g. in the English-only public test file). Split from the file name:
`..._training_...` -> train, `..._validation_...` -> val, `..._test_...` -> test; another name
is an input error. The LECCR split (val and test both cut from the official validation set)
needs `--split-ids val=FILE --split-ids test=FILE` with videoIDs, one per line.

Videos: a file named `<videoID>.<ext>` (mp4, webm, mkv, avi) anywhere under the media root;
none -> the item is an error row "not_found" and its captions are kept. Item key
"vatex:<videoID>"; caption key "<index in enCap/chCap>".
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.readers.common import Collector, StageInputError, find_files, read_json

MEDIA = "video"
NAMESPACE = "vatex"
LANGS = ("en", "zh")
_FIELDS = {"en": "enCap", "zh": "chCap"}

_FILES = re.compile(r"^vatex_.*\.json$", re.IGNORECASE)


def native_id(text: str) -> str:
    return text.strip()


def _split(name: str) -> str | None:
    lower = name.lower()
    for word, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if word in lower:
            return split
    return None


def read(root: Path, col: Collector, explicit_langs: bool) -> None:
    found = find_files(root, _FILES)
    if not found:
        raise StageInputError(f"vatex: no vatex_*.json under {root}")
    order = {"train": 0, "val": 1, "test": 2}
    files = []
    for _, path in found:
        split = _split(path.name)
        if split is None:
            raise StageInputError(f"vatex: cannot tell the split of {path.name} (expected training, validation "
                                  f"or test in the name)")
        files.append((order[split], str(path), split, path))
    seen_langs: set[str] = set()
    for _, _, split, path in sorted(files):
        col.annotation_files.append(path)
        data = read_json(path)
        if not isinstance(data, list):
            raise StageInputError(f"vatex: {path} must hold a JSON list of {{videoID, enCap, chCap}} objects")
        for entry in data:
            vid = entry.get("videoID") if isinstance(entry, dict) else None
            if not isinstance(vid, str) or not vid.strip():
                col.skipped["bad_entry"] += 1
                continue
            vid = vid.strip()
            item = col.item(vid, split, stem=vid)
            for lang in col.langs:
                caps = entry.get(_FIELDS[lang])
                if caps is None:
                    continue
                if not isinstance(caps, list):
                    col.skipped["bad_caption"] += 1
                    continue
                seen_langs.add(lang)
                for i, text in enumerate(caps):
                    col.caption(item, lang, str(i), text)
    missing = [lang for lang in col.langs if lang not in seen_langs]
    if explicit_langs and missing:
        raise StageInputError(f"vatex: no {', '.join(_FIELDS[m] for m in missing)} captions in the files under {root}")
