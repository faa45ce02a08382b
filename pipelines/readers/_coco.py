"""COCO image ids and file names, shared by the stair and coco-cn readers.

Item key "coco:<numeric image id>": the same key `leccr-pipe ingest` gives a COCO image, so
English captions ingested from `captions_*.json` and ja/zh captions imported here land on the
same item when the dataset name matches (`--dataset`; the default here is "coco").
"""

from __future__ import annotations

import re

NAMESPACE = "coco"
_ID = re.compile(r"^(?:COCO_)?(?:(train|val|test)(\d{4})_)?0*(\d+)(?:\.jpe?g)?$", re.IGNORECASE)


def parse_image_id(text: str) -> tuple[str, str | None] | None:
    """`COCO_val2014_000000000042`, `val2014_000000000042`, `000000000042.jpg` or `42`
    -> ("42", "val2014" or None). None when it is none of these."""
    match = _ID.match(text.strip())
    if not match:
        return None
    folder = f"{match.group(1).lower()}{match.group(2)}" if match.group(1) else None
    return str(int(match.group(3))), folder


def native_id(text: str) -> str:
    parsed = parse_image_id(text)
    return parsed[0] if parsed else text.strip()


def file_names(image_id: str, folder: str | None = None, given: str | None = None) -> list[str]:
    """Base names to look for, most specific first: the annotation's own file_name, then the
    2014 names (`COCO_<folder>_%012d.jpg`), then the 2017 name (`%012d.jpg`). COCO 2014 and
    2017 hold the same images under these names."""
    n = int(image_id)
    names = [given] if given else []
    folders = [folder] if folder else ["train2014", "val2014"]
    names += [f"COCO_{f}_{n:012d}.jpg" for f in folders]
    names.append(f"{n:012d}.jpg")
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen
