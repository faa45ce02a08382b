"""The report on a workdir with error rows and no training yet: errors grouped by kind with
examples, the gallery's thumbnails and captions, and a clear exit 2 without a workdir.
(The full report, with plots and searches, opened in Chromium: tests/test_recipes.py.)"""

from __future__ import annotations

import datetime as dt
import json
import re

import pyarrow as pa

import schemas
from pipelines import ingest, store
from pipelines.sample_data import make_sample_dataset, write_reference_captions
from tests.conftest import run_cli


def _workdir(tmp_path):
    data = make_sample_dataset(tmp_path / "data", n_images=4, n_videos=0, val_images=1, test_images=1)
    coco = json.loads((data / "annotations" / "captions_train.json").read_text())
    coco["images"].append({"id": 99, "file_name": "images/missing.jpg"})          # an ingest error row
    (data / "annotations" / "captions_train.json").write_text(json.dumps(coco))
    wd = tmp_path / "wd"
    ingest.run(ingest.IngestConfig(input=data, workdir=wd, dataset="sample"))
    write_reference_captions(data, wd, "sample")
    manifest = store.read_folder(wd / "manifest", schemas.MANIFEST).to_pylist()
    good = [r for r in manifest if r["error_kind"] is None]
    now = dt.datetime.now(dt.timezone.utc)
    empty = {f.name: None for f in schemas.DESCRIPTIONS}
    rows = [{**empty, "item_id": good[0]["item_id"], "view": "detailed", "text": "A red circle on blue.",
             "created_at": now},
            {**empty, "item_id": good[1]["item_id"], "view": "detailed", "error_kind": "unreadable_image",
             "error": "broken.jpg: truncated", "created_at": now},
            {**empty, "item_id": good[2]["item_id"], "view": "detailed", "error_kind": "unreadable_image",
             "error": "other.jpg: truncated", "created_at": now}]
    store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.DESCRIPTIONS), wd / "descriptions" / "part-x.parquet")
    return wd, len(good)


def test_report_groups_errors_and_shows_the_gallery(tmp_path):
    wd, readable = _workdir(tmp_path)
    done = run_cli("report", "--workdir", wd, "--gallery", "50")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(wd / "report.html")
    page = (wd / "report.html").read_text(encoding="utf-8")
    errors = page.split("<h2>Errors</h2>")[1]
    assert re.search(r"<td>describe</td><td>unreadable_image</td><td>2</td>", errors)
    assert re.search(r"<td>ingest</td><td>not_found</td><td>1</td>", errors)
    assert "broken.jpg: truncated" in errors
    gallery = page.split("<h2>Gallery</h2>")[1].split("<h2>")[0]
    assert gallery.count('class="thumb"') == readable == 6                       # every readable image, inline
    assert gallery.count("data:image/jpeg;base64,") == readable
    assert "A red circle on blue." in gallery and 'class="err">unreadable_image' in gallery
    assert "<b>pt</b>" in gallery                                                 # the Portuguese references
    assert "No training logs or evaluations yet." in page and "No index yet" in page


def test_report_without_a_workdir_exits_2(tmp_path):
    done = run_cli("report", "--workdir", tmp_path / "nothing")
    assert done.returncode == 2 and "has no manifest" in done.stderr
