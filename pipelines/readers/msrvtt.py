"""MSR-VTT (English captions) + MSR-VTT-CN (Chinese captions) + a videos folder.

English / splits (required; found by name anywhere under --input): `MSRVTT_data.json`,
`train_val_videodatainfo.json`, `test_videodatainfo.json` (the 2016 release; a folder may hold
the first or the other two). Format: `{"videos": [{"video_id": "video0", "split": "train"}],
"sentences": [{"video_id": "video0", "caption": "...", "sen_id": 0}]}`; split train /
validate (-> val) / test (6,513 / 497 / 2,990).

Chinese (MSR-VTT-CN, needed for `--lang zh`; found by the name pattern
`msrvtt[-_]cn*.{json,jsonl,tsv,txt}` or `msr-vtt-cn*...`, case-insensitive, several files
allowed). Accepted contents, keyed by MSR-VTT video id:
- JSON, one of: `{"sentences": [{"video_id", "caption", "sen_id"?}]}` (as MSR-VTT);
  a list of `{"video_id", "caption", "sen_id"?}` objects; or `{"video0": ["caption", ...]}`
  (a single string is one caption).
- JSON Lines: one `{"video_id", "caption", "sen_id"?}` object per line.
- TSV / TXT: `<caption id><TAB><caption>` per line, where the caption id is the video id,
  optionally followed by `#`-separated parts whose last is the caption number (`video0`,
  `video0#3`, `video0#enc#3`, `video0#zh#3`); without a TAB the first space separates them (the
  `video0#enc#0 caption` style of dual-encoding data files). A header line starting
  `video_id` is skipped.
Caption key: `sen_id`, or the whole caption id of a TSV line when it has a `#` number
(`video0#enc#3`), else "<video id>:<position among the video's unnumbered captions>" (files
in name order). Chinese captions of a video
id that the MSR-VTT JSON does not list are skipped (unknown_item), never invented as items.

Videos: `<video id>.<ext>` (mp4, webm, mkv, avi; `video0.mp4`) anywhere under the media root
(`TrainValVideo/`, `TestVideo/`, `videos/all/`, ...). Item key "msrvtt:<video id>".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.readers.common import Collector, StageInputError, find_files, read_json, read_lines, read_text

MEDIA = "video"
NAMESPACE = "msrvtt"
LANGS = ("en", "zh")

_MAIN = re.compile(r"^(msrvtt_data|train_val_videodatainfo|test_videodatainfo)\.json$", re.IGNORECASE)
_CN = re.compile(r"^msr-?vtt[-_]?cn.*\.(json|jsonl|tsv|txt)$", re.IGNORECASE)


def native_id(text: str) -> str:
    return text.strip()


def read(root: Path, col: Collector, explicit_langs: bool) -> None:
    mains = [p for _, p in find_files(root, _MAIN)]
    names = {p.name.lower() for p in mains}
    if "msrvtt_data.json" in names and len(names) > 1:
        # MSRVTT_data.json is the union of the other two: reading both would only duplicate
        keep = [p for p in mains if p.name.lower() == "msrvtt_data.json"][:1]
        col.notes.extend(f"ignored {p.relative_to(root)}: MSRVTT_data.json holds the same data" for p in mains
                         if p not in keep)
        mains = keep
    if not mains:
        raise StageInputError(f"msrvtt: no MSRVTT_data.json or *_videodatainfo.json under {root}")
    videos: dict[str, str] = {}
    for path in mains:
        col.annotation_files.append(path)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("videos"), list) \
                or not isinstance(data.get("sentences", []), list):
            raise StageInputError(f"msrvtt: {path} needs a 'videos' list (and a 'sentences' list)")
        for entry in data["videos"]:
            vid = entry.get("video_id") if isinstance(entry, dict) else None
            if not isinstance(vid, str) or not vid.strip():
                col.skipped["bad_entry"] += 1
                continue
            vid = vid.strip()
            videos[vid] = col.item(vid, entry.get("split") if isinstance(entry.get("split"), str) else None, stem=vid)
        if "en" in col.langs:
            _add(col, videos, "en", _sentences(data["sentences"], col), {})

    if "zh" in col.langs:
        cn_files = [p for _, p in find_files(root, _CN)]
        if not cn_files and explicit_langs:
            raise StageInputError(f"msrvtt: --lang zh needs an MSR-VTT-CN file under {root} "
                                  f"(msrvtt_cn*.json|jsonl|tsv|txt)")
        if not cn_files:
            col.notes.append("no MSR-VTT-CN file found (msrvtt_cn*.json|jsonl|tsv|txt): no zh captions")
        position: dict[str, int] = {}
        for path in cn_files:
            col.annotation_files.append(path)
            _add(col, videos, "zh", _read_cn(path, col), position)


def _sentences(entries: list, col: Collector) -> list[tuple[str, str | None, object]]:
    out = []
    for entry in entries:
        vid = entry.get("video_id") if isinstance(entry, dict) else None
        if not isinstance(vid, str):
            col.skipped["bad_entry"] += 1
            continue
        sen = entry.get("sen_id")
        out.append((vid.strip(), str(sen) if isinstance(sen, (int, str)) else None, entry.get("caption")))
    return out


def _add(col: Collector, videos: dict[str, str], lang: str, rows, position: dict[str, int]) -> None:
    """rows: (video id, caption key or None, text). Captions without a key are numbered by
    their position among the video's unkeyed captions (`position` carries on across files)."""
    for vid, key, text in rows:
        item = videos.get(vid)
        if item is None:
            col.skipped["unknown_item"] += 1
            continue
        if key is None:
            n = position.get(vid, 0)
            position[vid] = n + 1
            key = f"{vid}:{n}"
        col.caption(item, lang, key, text)


def _read_cn(path: Path, col: Collector) -> list[tuple[str, str | None, object]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("sentences"), list):
            return _sentences(data["sentences"], col)
        if isinstance(data, list):
            return _sentences(data, col)
        if isinstance(data, dict):
            rows = []
            for vid, caps in data.items():
                caps = [caps] if isinstance(caps, str) else caps
                if not isinstance(caps, list):
                    col.skipped["bad_entry"] += 1
                    continue
                rows.extend((str(vid).strip(), None, c) for c in caps)
            return rows
        raise StageInputError(f"msrvtt: {path} is neither a list nor an object of MSR-VTT-CN captions")
    if suffix == ".jsonl":
        entries = []
        for line in read_text(path).splitlines():
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                col.skipped["bad_line"] += 1
        return _sentences(entries, col)
    rows = []
    for line in read_lines(path):
        if not line.strip():
            continue
        head, sep, text = line.partition("\t")
        if not sep:
            head, sep, text = line.strip().partition(" ")
        if not sep or not head.strip():
            col.skipped["bad_line"] += 1
            continue
        head = head.strip()
        if head.lower() in ("video_id", "videoid", "id", "sentence_id"):
            continue                                          # header line
        vid, *rest = head.split("#")
        number = rest[-1] if rest and rest[-1].strip().isdigit() else None
        rows.append((vid.strip(), head if number is not None else None, text))
    return rows
