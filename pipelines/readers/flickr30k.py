"""Flickr30K English captions (5 per image) + Flickr30K images.

Accepted caption files (found by name anywhere under --input; the token file wins if both exist):
- `results_20130124.token` (also `results.token`): `<file name>#<n>\t<caption>` per line, the
  original release.
- `results.csv` (the common Kaggle copy): a header line `image_name| comment_number| comment`,
  then `<file name>| <n>| <caption>`; `|` separated, fields stripped. A line whose number and
  caption lost their separator (`name| 4   A dog ...`) is read too; any other malformed line is
  skipped and counted as bad_line.

Splits: the Multi30K image lists (`image_splits/<split>.txt`, see multi30k.py) when they are
under --input; otherwise null, and an item keeps the split an earlier `multi30k` import gave it
in the same workdir. Item key "flickr30k:<file stem>" (shared with the multi30k format);
caption key "<n>" (the caption's number within its image).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.readers import multi30k
from pipelines.readers.common import Collector, StageInputError, find_files, read_lines

MEDIA = "image"
NAMESPACE = "flickr30k"
LANGS = ("en",)
native_id = multi30k.native_id

_FILES = re.compile(r"^(results(_\d+)?\.token|results\.csv)$")
_CSV_LOOSE = re.compile(r"^\s*(\d+)\s+(.*)$")


def _parse_token(line: str) -> tuple[str, str, str] | None:
    head, sep, text = line.partition("\t")
    name, hash_, n = head.strip().rpartition("#")
    if not sep or not hash_ or not name or not n.strip().isdigit():
        return None
    return name, n.strip(), text


def _parse_csv(line: str) -> tuple[str, str, str] | None:
    parts = line.split("|", 2)
    if len(parts) == 3 and parts[1].strip().isdigit():
        return parts[0].strip(), parts[1].strip(), parts[2]
    if len(parts) == 2:
        loose = _CSV_LOOSE.match(parts[1])
        if loose:
            return parts[0].strip(), loose.group(1), loose.group(2)
    return None


def read(root: Path, col: Collector, explicit_langs: bool) -> None:
    found = find_files(root, _FILES)
    if not found:
        raise StageInputError(f"flickr30k: no results_20130124.token or results.csv under {root}")
    tokens = [p for m, p in found if p.name.endswith(".token")]
    path = tokens[0] if tokens else found[0][1]
    for _, other in found:
        if other != path:
            col.notes.append(f"ignored {other.relative_to(root)}: {path.relative_to(root)} is used")
    col.annotation_files.append(path)

    split_of: dict[str, str] = {}
    for split, list_path in multi30k.image_lists(root, col.notes).items():
        if split in multi30k.SPLITS:
            col.annotation_files.append(list_path)
            for name in multi30k.read_image_list(list_path):
                if name:
                    split_of.setdefault(native_id(name), multi30k.SPLITS[split])

    csv = path.name.endswith(".csv")
    lines = read_lines(path)
    if csv and lines and lines[0].replace(" ", "").lower().startswith("image_name|"):
        lines = lines[1:]
    parse = _parse_csv if csv else _parse_token
    for line in lines:
        if not line.strip():
            continue
        parsed = parse(line)
        if parsed is None or not parsed[0]:
            col.skipped["bad_line"] += 1
            continue
        name, n, text = parsed
        key = native_id(name)
        item = col.item(key, split_of.get(key), names=[name])
        col.caption(item, "en", n, text)
