"""Ingest readers: stable ids, COCO and plain folders, and every unusable-input case."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from pipelines import ingest, store
from tests.conftest import run_cli


def _image(path, color=(200, 30, 30), size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _coco(root, images, annotations, name="captions_train.json"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / name).write_text(json.dumps({"images": images, "annotations": annotations}))


def _manifest(workdir):
    return store.read_folder(workdir / store.MANIFEST_DIR, schemas.MANIFEST).to_pylist()


def _captions(workdir):
    return store.read_folder(workdir / store.CAPTIONS_DIR, schemas.CAPTIONS).to_pylist()


def test_coco_reader_ids_captions_and_confinement(tmp_path):
    root = tmp_path / "coco"
    _image(root / "images" / "1.jpg")
    _image(root / "images" / "2.jpg")
    (tmp_path / "secret.jpg").write_bytes(b"outside")
    _coco(root, [{"id": 1, "file_name": "images/1.jpg"}, {"id": 2, "file_name": "images/2.jpg"},
                 {"id": 3, "file_name": "../secret.jpg"}, {"id": 4, "file_name": "/etc/hostname.jpg"},
                 {"id": 5}, {"file_name": "images/1.jpg"}],
          [{"id": 10, "image_id": 1, "caption": " A red box. "}, {"id": 11, "image_id": 1, "caption": "red"},
           {"id": 12, "image_id": 2, "caption": "another"}, {"id": 13, "image_id": 99, "caption": "orphan"}])
    report = ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "w", dataset="coco"))
    rows = {r["source_id"]: r for r in _manifest(tmp_path / "w")}
    assert report.reader == "coco" and report.items == 5 and report.captions == 3
    assert report.skipped_entries == 2  # the image entry without id, the orphan caption
    assert rows["1"]["error"] is None and rows["1"]["media_type"] == "image" and rows["1"]["split"] == "train"
    assert rows["3"]["error_kind"] == "outside_root" and rows["4"]["error_kind"] == "outside_root"
    assert rows["5"]["error_kind"] == "bad_annotation"
    caps = _captions(tmp_path / "w")
    assert sorted(c["text"] for c in caps) == ["A red box.", "another", "red"]
    assert {c["item_id"] for c in caps} == {rows["1"]["item_id"], rows["2"]["item_id"]}
    assert all(c["origin"] == "human" and c["lang"] == "en" for c in caps)


def test_coco_2017_layout_finds_the_split_folder(tmp_path):
    root = tmp_path / "coco"
    _image(root / "train2017" / "000000000009.jpg")
    _image(root / "val2017" / "000000000139.jpg")
    _coco(root, [{"id": 9, "file_name": "000000000009.jpg"}], [{"id": 1, "image_id": 9, "caption": "a"}],
          name="captions_train2017.json")
    _coco(root, [{"id": 139, "file_name": "000000000139.jpg"}], [{"id": 2, "image_id": 139, "caption": "b"}],
          name="captions_val2017.json")
    report = ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "w", dataset="coco"))
    rows = {r["split"]: r for r in _manifest(tmp_path / "w")}
    assert report.items == 2 and not report.item_errors
    assert rows["train2017"]["root"] == str((root / "train2017").resolve())
    assert rows["val2017"]["relpath"] == "000000000139.jpg" and rows["val2017"]["error"] is None


def test_ids_are_stable_across_runs_and_entry_order(tmp_path):
    root = tmp_path / "coco"
    for i in range(3):
        _image(root / f"{i}.jpg")
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)]
    anns = [{"id": 100 + i, "image_id": i, "caption": f"c{i}"} for i in range(3)]
    _coco(root, images, anns)
    ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "a", dataset="d"))
    _coco(root, images[::-1], anns[::-1])
    ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "b", dataset="d"))
    for reader in (_manifest, _captions):
        assert reader(tmp_path / "a") == reader(tmp_path / "b")
    ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "c", dataset="other"))
    assert {r["item_id"] for r in _manifest(tmp_path / "c")}.isdisjoint({r["item_id"] for r in _manifest(tmp_path / "a")})


def test_folder_reader_recursive_sidecars_symlinks_and_bad_names(tmp_path):
    root = tmp_path / "media"
    _image(root / "a" / "x.png")
    _image(root / "b" / "c" / "y.jpg")
    (root / "b" / "c" / "y.txt").write_text("first caption\n\nsecond caption\n")
    (root / "notes.md").write_text("not media")
    outside = tmp_path / "outside.jpg"
    _image(outside)
    os.symlink(outside, root / "link_out.jpg")
    os.symlink(root / "a" / "x.png", root / "link_in.png")
    bad_name = os.fsencode(str(root)) + b"/bad\xff.jpg"
    with open(bad_name, "wb") as fh:
        fh.write(b"x")
    ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "w"))
    rows = _manifest(tmp_path / "w")
    by_path = {r["relpath"]: r for r in rows}
    assert len(rows) == 5
    assert by_path["a/x.png"]["error"] is None and by_path["b/c/y.jpg"]["error"] is None
    assert by_path["link_in.png"]["error"] is None
    assert by_path["link_out.jpg"]["error_kind"] == "outside_root"
    bad = [r for r in rows if r["error_kind"] == "bad_filename"]
    assert len(bad) == 1 and "not valid UTF-8" in bad[0]["error"] and "\\xff" in bad[0]["error"]
    caps = _captions(tmp_path / "w")
    assert [c["text"] for c in sorted(caps, key=lambda c: c["text"])] == ["first caption", "second caption"]
    assert {c["item_id"] for c in caps} == {by_path["b/c/y.jpg"]["item_id"]}


def test_written_files_read_back_with_explicit_schema(tmp_path):
    root = tmp_path / "m"
    _image(root / "x.jpg")
    ingest.run(ingest.IngestConfig(input=root, workdir=tmp_path / "w"))
    assert pq.read_schema(tmp_path / "w" / "manifest" / "manifest.parquet").equals(schemas.MANIFEST)


@pytest.mark.parametrize("case", ["empty", "missing_json", "malformed_json", "not_coco", "not_a_folder"])
def test_unusable_input_is_a_clear_cli_error(tmp_path, case):
    root = tmp_path / "in"
    root.mkdir()
    args = ["ingest", "--input", root, "--workdir", tmp_path / "w"]
    expected = {"empty": "no images or videos found", "missing_json": "does not exist",
                "malformed_json": "is not valid JSON", "not_coco": "no 'images' list",
                "not_a_folder": "is not a folder"}[case]
    if case == "missing_json":
        args += ["--annotations", root / "nope.json"]
    elif case == "malformed_json":
        (root / "annotations").mkdir()
        (root / "annotations" / "captions_val.json").write_text('{"images": [')
    elif case == "not_coco":
        (root / "annotations").mkdir()
        (root / "annotations" / "captions_val.json").write_text('[1, 2]')
    elif case == "not_a_folder":
        args[2] = tmp_path / "missing"
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_help_is_instant_no_heavy_imports():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom pipelines.cli import app\n"
            "for args in (['--help'], ['describe', '--help'], ['ingest', '--help'], ['demo', '--help']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0\n"
            "heavy = [m for m in ('torch', 'ray', 'vllm', 'transformers', 'decord') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
