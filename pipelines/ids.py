"""Stable ids and fingerprints.

Ids never depend on run order: an item's id is a hash of its dataset name and its own key (the
dataset's id, or the path relative to the input root, as bytes so that any filename works).
Fingerprints hash everything that determines a generated row, so a change of model, prompt,
sampling or preprocessing yields a new fingerprint and never reuses old output.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _digest(*parts: bytes | str, length: int = 16) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length prefix: ("ab","c") != ("a","bc")
        h.update(data)
    return h.hexdigest()[:length]


def item_id(dataset: str, key: str | bytes) -> str:
    """Id of a media item; `key` is the dataset's own id or the relative path."""
    # str keys are encoded with surrogateescape: a non-UTF-8 filename from os.walk hashes to
    # its original bytes, so the id is the same whichever way the path was obtained.
    return _digest("item", dataset, key)


def caption_id(item: str, lang: str, key: str) -> str:
    """Id of a caption; `key` is the annotation's own id or its position within the item."""
    return _digest("caption", item, lang, key)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(spec: dict[str, Any]) -> str:
    """Hash of a generation spec (engine, model, revision, prompt, sampling, preprocessing)."""
    return _digest("fingerprint", canonical_json(spec), length=24)


def content_key(keys: list[str]) -> str:
    """Deterministic name for an output file holding exactly these row keys."""
    return _digest("rows", "\n".join(sorted(keys)), length=20)
