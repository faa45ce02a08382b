"""Benchmark readers (pipelines/readers): every format on small files written here, read back
with pyarrow. Counts, splits, languages, stable ids, missing media, confinement, bad input."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from pipelines import ids, ingest, readers, store
from pipelines.readers.common import StageInputError
from tests.conftest import run_cli


def _image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), color).save(path)


def _video(path):
    from pipelines.sample_data import make_video
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    frames[1] += 255
    make_video(path, frames, fps=2)


def _write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def _run(fmt, inp, work, **kw):
    return readers.run(readers.ImportConfig(format=fmt, input=inp, workdir=work, **kw))


def _manifest(work):
    table = pq.read_table(work / "manifest" / "manifest.parquet")
    schemas.validate(table.schema, schemas.MANIFEST)
    return {r["source_id"]: r for r in table.to_pylist()}


def _caps(work, lang, fmt):
    table = pq.read_table(work / "captions" / f"human-{lang}-{fmt}.parquet")
    schemas.validate(table.schema, schemas.CAPTIONS)
    return table.to_pylist()


# ----------------------------------------------------------------------------- Multi30K + Flickr30K


def _multi30k(root, with_missing=True):
    """3 train images (one missing on disk), 1 val, 2 test; de/fr/cs/en text files."""
    lists = {"train": ["1001.jpg", "1002.jpg", "1003.jpg"], "val": ["2001.jpg"], "test_2016_flickr": ["3001.jpg", "3002.jpg"]}
    for split, names in lists.items():
        _write(root / "data/task1/image_splits" / f"{split}.txt", "\n".join(names) + "\n")
        for lang in ("en", "de", "fr", "cs"):
            text = "\n".join(f"{lang} caption {i} of {split}" for i in range(len(names))) + "\n"
            _write(root / "data/task1/raw" / (f"{split}.{lang}" + (".gz" if lang == "cs" else "")), text,
                   gz=lang == "cs")
    _write(root / "data/task1/raw/test_2017_flickr.de", "ignored\n")
    _write(root / "data/task1/image_splits/test_2017_flickr.txt", "9.jpg\n")
    for names in lists.values():
        for name in names:
            if not (with_missing and name == "1003.jpg"):
                _image(root / "flickr30k-images" / name)


def test_multi30k_counts_splits_langs_and_missing_image(tmp_path):
    root, work = tmp_path / "m30k", tmp_path / "w"
    _multi30k(root)
    report = _run("multi30k", root, work)
    items = _manifest(work)
    assert report.items == len(items) == 6 and report.dataset == "flickr30k"
    assert report.splits == {"test": 2, "train": 3, "val": 1}
    assert {k: v["split"] for k, v in items.items()} == {"1001": "train", "1002": "train", "1003": "train",
                                                         "2001": "val", "3001": "test", "3002": "test"}
    assert items["1001"]["error_kind"] is None and items["1001"]["relpath"] == "flickr30k-images/1001.jpg"
    assert items["1001"]["media_type"] == "image" and items["1001"]["size_bytes"] > 0
    # a caption whose image is missing is kept; the item is a not_found error row
    assert items["1003"]["error_kind"] == "not_found" and items["1003"]["relpath"] is None
    assert report.item_errors == {"not_found": 1} and report.captions_of_error_items == 4
    assert report.captions == {"cs": 6, "de": 6, "en": 6, "fr": 6}
    assert any("test_2017_flickr" in n for n in report.notes)
    de = _caps(work, "de", "multi30k")
    assert all(c["origin"] == "human" and c["lang"] == "de" for c in de)
    by_item = {c["item_id"]: c for c in de if c["split"] == "test"}
    assert by_item[items["3002"]["item_id"]]["text"] == "de caption 1 of test_2016_flickr"
    assert items["1001"]["item_id"] == ids.item_id("flickr30k", "flickr30k:1001")


def test_ids_are_stable_across_runs_and_workdirs(tmp_path):
    root = tmp_path / "m30k"
    _multi30k(root)
    _run("multi30k", root, tmp_path / "a")
    _run("multi30k", root, tmp_path / "a", langs=("de",))          # rerun into the same workdir
    _run("multi30k", root, tmp_path / "b", langs=("de",))
    a, b = pq.read_table(tmp_path / "a/captions/human-de-multi30k.parquet"), \
        pq.read_table(tmp_path / "b/captions/human-de-multi30k.parquet")
    assert a.equals(b)
    assert pq.read_table(tmp_path / "a/manifest/manifest.parquet").equals(
        pq.read_table(tmp_path / "b/manifest/manifest.parquet"))
    assert not (tmp_path / "b/captions/human-en-multi30k.parquet").exists()


def test_multi30k_bad_input(tmp_path):
    root = tmp_path / "m30k"
    _multi30k(root)
    with pytest.raises(StageInputError, match="multi30k has captions in en, de, fr, cs; not in ja"):
        _run("multi30k", root, tmp_path / "w", langs=("ja",))
    _write(root / "data/task1/raw/val.de", "one\ntwo\n")            # 2 lines, 1 image
    with pytest.raises(StageInputError, match="not aligned"):
        _run("multi30k", root, tmp_path / "w")
    with pytest.raises(StageInputError, match="no Multi30K task1 files"):
        _run("multi30k", tmp_path / "m30k/flickr30k-images", tmp_path / "w")
    (root / "data/task1/raw/val.de").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(StageInputError, match="not UTF-8"):
        _run("multi30k", root, tmp_path / "w", langs=("de",))


def test_flickr30k_token_and_csv_merge_with_multi30k(tmp_path):
    root, work = tmp_path / "m30k", tmp_path / "w"
    _multi30k(root)
    _run("multi30k", root, work, langs=("de",))
    tok = tmp_path / "f30k"
    lines = [f"{n}.jpg#{i}\tA caption {i} of {n} ." for n in (1001, 1002, 2001) for i in range(5)]
    _write(tok / "results_20130124.token", "\n".join(lines + ["garbage line", "4444.jpg#x\tbad number"]) + "\n")
    report = _run("flickr30k", tok, work, media_root=root)
    assert report.captions == {"en": 15} and report.skipped == {"bad_line": 2}
    items = _manifest(work)
    assert len(items) == 6                                       # same images, same ids: nothing added
    en = _caps(work, "en", "flickr30k")
    assert {c["item_id"] for c in en} == {items[k]["item_id"] for k in ("1001", "1002", "2001")}
    assert {c["split"] for c in en if c["item_id"] == items["2001"]["item_id"]} == {"val"}   # from the manifest
    assert (work / "captions/human-de-multi30k.parquet").is_file()

    csv = tmp_path / "kaggle"
    _write(csv / "results.csv", "image_name| comment_number| comment\n"
                                "1001.jpg| 0| A dog | with a pipe in it .\n"
                                "1001.jpg| 4   Joined number and caption .\n"
                                "1002.jpg| 0| Another .\n"
                                "broken\n")
    report = _run("flickr30k", csv, tmp_path / "w2", media_root=root)
    caps = {c["text"] for c in _caps(tmp_path / "w2", "en", "flickr30k")}
    assert caps == {"A dog | with a pipe in it .", "Joined number and caption .", "Another ."}
    assert report.skipped == {"bad_line": 1} and report.splits == {"none": 2}
    cid = ids.caption_id(ids.item_id("flickr30k", "flickr30k:1001"), "en", "4")
    assert cid in {c["caption_id"] for c in _caps(tmp_path / "w2", "en", "flickr30k")}


def test_paths_are_confined_to_the_media_root(tmp_path):
    root, work = tmp_path / "m30k", tmp_path / "w"
    _image(tmp_path / "secret" / "s.jpg")
    _image(root / "imgs" / "ok.jpg")
    os.symlink(tmp_path / "secret" / "s.jpg", root / "imgs" / "link.jpg")
    _write(root / "image_splits/train.txt", "ok.jpg\n../secret/s.jpg\nlink.jpg\n/etc/passwd.jpg\n")
    _write(root / "train.de", "a\nb\nc\nd\n")
    report = _run("multi30k", root, work)
    items = _manifest(work)
    assert items["ok"]["error_kind"] is None
    assert items["s"]["error_kind"] == "outside_root"           # ../ escapes
    assert items["link"]["error_kind"] == "outside_root"        # symlinked file escapes
    assert items["passwd"]["error_kind"] == "outside_root"      # absolute path
    assert report.item_errors == {"outside_root": 3} and report.captions == {"de": 4}


# ----------------------------------------------------------------------------- COCO: STAIR + COCO-CN


def _stair(root):
    images = [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}, {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"},
              {"id": 77}, {"file_name": "no-id.jpg"}]
    anns = [{"id": 1, "image_id": 9, "caption": "犬が走っている。"}, {"id": 2, "image_id": 9, "caption": "茶色の犬"},
            {"id": 3, "image_id": 25, "caption": "  "}, {"id": 4, "image_id": 404, "caption": "孤児"},
            {"id": 5, "image_id": 77, "caption": "猫"}]
    _write(root / "stair_captions_v1.2_train.json", json.dumps({"images": images, "annotations": anns}))
    _write(root / "stair_captions_v1.2_train_tokenized.json", json.dumps({"images": [], "annotations": []}))
    _write(root / "stair_captions_v1.2_val.json", json.dumps(
        {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
         "annotations": [{"id": 7, "image_id": 42, "caption": "赤いバス"}]}))


def test_stair_and_coco_cn_share_coco_items_with_ingest(tmp_path):
    coco, work = tmp_path / "coco", tmp_path / "w"
    _image(coco / "train2014" / "COCO_train2014_000000000009.jpg")
    _image(coco / "val2014" / "COCO_val2014_000000000042.jpg")
    _image(coco / "val2017" / "000000000077.jpg")                # 2017 name, found by id
    # an English ingest of the same images first (dataset "coco", key coco:<id>)
    (coco / "annotations").mkdir()
    (coco / "annotations/captions_train2014.json").write_text(json.dumps(
        {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"}],
         "annotations": [{"id": 1, "image_id": 9, "caption": "a dog"}]}))
    ingest.run(ingest.IngestConfig(input=coco, workdir=work, dataset="coco"))
    en_item = _manifest(work)["9"]["item_id"]

    stair = tmp_path / "stair"
    _stair(stair)
    report = _run("stair", stair, work, media_root=coco)
    items = _manifest(work)
    assert items["9"]["item_id"] == en_item and items["9"]["error_kind"] is None
    assert items["9"]["relpath"] in ("COCO_train2014_000000000009.jpg", "train2014/COCO_train2014_000000000009.jpg")
    assert items["25"]["error_kind"] == "not_found" and items["77"]["relpath"] == "val2017/000000000077.jpg"
    assert items["42"]["split"] == "val" and items["77"]["split"] == "train"
    assert report.captions == {"ja": 4} and report.skipped == {"bad_entry": 1, "empty_caption": 1, "unknown_item": 1}
    assert any("_tokenized" in n for n in report.notes)
    ja = {c["text"]: c for c in _caps(work, "ja", "stair")}
    assert ja["犬が走っている。"]["caption_id"] == ids.caption_id(en_item, "ja", "1")
    assert (work / "captions/human-en.parquet").is_file()      # ingest's file untouched

    cn = tmp_path / "coco-cn"
    _write(cn / "coco-cn_train.txt", "COCO_train2014_000000000009\n")
    _write(cn / "coco-cn_test.txt", "COCO_val2014_000000000042\n")
    _write(cn / "imageid.human-written-caption.txt",
           "COCO_train2014_000000000009#0\t一只狗在跑\nCOCO_val2014_000000000042#0\t红色的公共汽车\n"
           "COCO_val2014_000000000042#1\t一辆巴士\nval2014_000000000555#0\t不在列表\nno tab here\n")
    _write(cn / "imageid.manually-translated-caption.txt", "COCO_val2014_000000000042#0\t翻译\n")
    report = _run("coco-cn", cn, work, media_root=coco)
    items = _manifest(work)
    assert items["42"]["split"] == "test"                       # coco-cn's split list wins (newer import)
    assert items["555"]["split"] is None and items["555"]["error_kind"] == "not_found"
    assert report.captions == {"zh": 4} and report.skipped == {"bad_line": 1}
    assert any("manually-translated" in n for n in report.notes)
    zh = _caps(work, "zh", "coco-cn")
    assert {c["item_id"] for c in zh} >= {en_item, items["42"]["item_id"]}
    assert {c["split"] for c in zh if c["item_id"] == items["42"]["item_id"]} == {"test"}


# ----------------------------------------------------------------------------- VATEX


def test_vatex_videos_missing_video_and_split_override(tmp_path):
    root, work = tmp_path / "vatex", tmp_path / "w"
    _video(root / "videos" / "abc_000010_000020.mp4")
    _video(root / "videos" / "sub" / "xyz-_000001_000011.webm")
    train = [{"videoID": "abc_000010_000020", "enCap": [f"en {i}" for i in range(10)],
              "chCap": [f"中文 {i}" for i in range(10)]},
             {"videoID": "missing_000000_000010", "enCap": ["en only"], "chCap": ["中文"]},
             {"enCap": ["no id"]}, "not an object"]
    val = [{"videoID": "xyz-_000001_000011", "enCap": ["v0", "v1"], "chCap": ["值0"]}]
    _write(root / "vatex_training_v1.0.json", json.dumps(train))
    _write(root / "vatex_validation_v1.0.json", json.dumps(val))
    _write(root / "vatex_public_test_english_v1.1.json", json.dumps([{"videoID": "t_000000_000010", "enCap": ["t"]}]))
    report = _run("vatex", root, work)
    items = _manifest(work)
    assert report.splits == {"test": 1, "train": 2, "val": 1}
    assert items["abc_000010_000020"]["relpath"] == "videos/abc_000010_000020.mp4"
    assert items["abc_000010_000020"]["media_type"] == "video"
    assert items["xyz-_000001_000011"]["relpath"] == "videos/sub/xyz-_000001_000011.webm"
    assert items["missing_000000_000010"]["error_kind"] == "not_found"
    assert report.item_errors == {"not_found": 2} and report.skipped == {"bad_entry": 2}
    assert report.captions == {"en": 14, "zh": 12} and report.captions_of_error_items == 3
    en = _caps(work, "en", "vatex")
    assert ids.caption_id(ids.item_id("vatex", "vatex:abc_000010_000020"), "en", "3") in {c["caption_id"] for c in en}

    ids_file = tmp_path / "test_ids.txt"
    ids_file.write_text("xyz-_000001_000011\nnot-in-vatex\n")
    report = _run("vatex", root, tmp_path / "w2", langs=("zh",), split_ids=(("test", ids_file),))
    assert report.splits == {"test": 2, "train": 2} and report.captions == {"zh": 12}
    assert {c["split"] for c in _caps(tmp_path / "w2", "zh", "vatex") if c["text"] == "值0"} == {"test"}
    assert any("not in the annotations" in n for n in report.notes)


def test_vatex_bad_input(tmp_path):
    root = tmp_path / "vatex"
    _write(root / "vatex_training_v1.0.json", "{not json")
    with pytest.raises(StageInputError, match="not valid JSON"):
        _run("vatex", root, tmp_path / "w")
    _write(root / "vatex_training_v1.0.json", json.dumps({"videoID": "x"}))
    with pytest.raises(StageInputError, match="JSON list"):
        _run("vatex", root, tmp_path / "w")
    _write(root / "vatex_training_v1.0.json", json.dumps([{"videoID": "x", "enCap": ["a"]}]))
    with pytest.raises(StageInputError, match="no chCap captions"):
        _run("vatex", root, tmp_path / "w", langs=("zh",))
    _write(root / "vatex_training_v1.0.json", json.dumps([]))
    with pytest.raises(StageInputError, match="name no item"):
        _run("vatex", root, tmp_path / "w")


# ----------------------------------------------------------------------------- MSR-VTT + MSR-VTT-CN


def _msrvtt(root):
    videos = [{"video_id": f"video{i}", "split": s, "id": i} for i, s in enumerate(["train", "train", "validate", "test"])]
    sentences = [{"video_id": f"video{i}", "caption": f"english {i}.{j}", "sen_id": i * 10 + j}
                 for i in range(4) for j in range(3)]
    sentences.append({"video_id": "video99", "caption": "unknown", "sen_id": 999})
    _write(root / "MSRVTT_data.json", json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    for i in (0, 1, 2):
        _video(root / "TrainValVideo" / f"video{i}.mp4")


def test_msrvtt_with_cn_tsv_and_json(tmp_path):
    root, work = tmp_path / "msrvtt", tmp_path / "w"
    _msrvtt(root)
    _write(root / "msrvtt_cn_train.tsv", "video_id\tcaption\nvideo0#zh#0\t一个人\nvideo0#zh#1\t一辆车\n"
                                         "video1\t没有编号\nvideo1\t第二句\nvideo404\t未知\n")
    _write(root / "msrvtt-cn_test.json", json.dumps({"video3": ["测试一", "测试二"], "video2": "验证"}))
    report = _run("msrvtt", root, work)
    items = _manifest(work)
    assert report.splits == {"test": 1, "train": 2, "val": 1}
    assert items["video0"]["relpath"] == "TrainValVideo/video0.mp4" and items["video3"]["error_kind"] == "not_found"
    assert report.captions == {"en": 12, "zh": 7} and report.skipped == {"unknown_item": 2}
    zh = _caps(work, "zh", "msrvtt")
    v0 = ids.item_id("msrvtt", "msrvtt:video0")
    assert ids.caption_id(v0, "zh", "video0#zh#1") in {c["caption_id"] for c in zh}
    assert {c["split"] for c in zh if c["text"].startswith("测试")} == {"test"}
    en = _caps(work, "en", "msrvtt")
    assert ids.caption_id(v0, "en", "2") in {c["caption_id"] for c in en}

    # the other accepted CN layouts give the same rows
    other = tmp_path / "msrvtt2"
    _msrvtt(other)
    _write(other / "msrvtt_cn.jsonl", "\n".join(json.dumps({"video_id": "video0", "caption": c, "sen_id": n})
                                                for n, c in enumerate(["一个人", "一辆车"])) + "\n")
    report = _run("msrvtt", other, tmp_path / "w3", langs=("zh",))
    assert report.captions == {"zh": 2}
    assert not (tmp_path / "w3/captions/human-en-msrvtt.parquet").exists()


def test_msrvtt_needs_its_json_and_a_cn_file_for_zh(tmp_path):
    root = tmp_path / "msrvtt"
    _write(root / "msrvtt_cn.tsv", "video0\t一个人\n")
    with pytest.raises(StageInputError, match="no MSRVTT_data.json"):
        _run("msrvtt", root, tmp_path / "w")
    root2 = tmp_path / "m2"
    _msrvtt(root2)
    with pytest.raises(StageInputError, match="MSR-VTT-CN file"):
        _run("msrvtt", root2, tmp_path / "w", langs=("zh",))
    report = _run("msrvtt", root2, tmp_path / "w")              # default languages: zh absent is a note
    assert report.captions == {"en": 12} and any("MSR-VTT-CN" in n for n in report.notes)


# ----------------------------------------------------------------------------- merge + CLI


def test_existing_manifest_rows_are_kept_and_output_is_sorted(tmp_path):
    sample, work = tmp_path / "sample", tmp_path / "w"
    _image(sample / "x.jpg")
    ingest.run(ingest.IngestConfig(input=sample, workdir=work, dataset="mine"))
    root = tmp_path / "vatex"
    _write(root / "vatex_training_v1.0.json", json.dumps([{"videoID": "a_1_2", "enCap": ["a"]}]))
    report = _run("vatex", root, work)
    table = pq.read_table(work / "manifest/manifest.parquet")
    assert report.manifest_rows == table.num_rows == 2
    assert table.column("item_id").to_pylist() == sorted(table.column("item_id").to_pylist())
    assert {r["dataset"] for r in table.to_pylist()} == {"mine", "vatex"}
    assert len(store.read_folder(work / "captions", schemas.CAPTIONS)) == 1   # ingest wrote no captions


def test_cli_import_and_exit_codes(tmp_path):
    root, work = tmp_path / "vatex", tmp_path / "w"
    _write(root / "vatex_training_v1.0.json", json.dumps([{"videoID": "a_1_2", "enCap": ["a"], "chCap": ["甲"]}]))
    ok = run_cli("import-benchmark", "--format", "vatex", "--input", root, "--workdir", work, "--lang", "en,zh",
                 "--report-json", tmp_path / "r.json", timeout=120)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["captions"] == {"en": 1, "zh": 1} and report["item_errors"] == {"not_found": 1}
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == report
    for args, message in [
        (("--format", "nope", "--input", root), "unknown format"),
        (("--format", "vatex", "--input", tmp_path / "absent"), "is not a folder"),
        (("--format", "stair", "--input", root), "no stair_captions"),
        (("--format", "vatex", "--input", root, "--lang", "ja"), "not in ja"),
        (("--format", "vatex", "--input", root, "--split-ids", "test"), "SPLIT=FILE"),
    ]:
        bad = run_cli("import-benchmark", *args, "--workdir", work, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_split_conflicts_and_split_id_files(tmp_path):
    root = tmp_path / "m30k"
    _write(root / "image_splits/train.txt", "1.jpg\n2.jpg\n")
    _write(root / "image_splits/val.txt", "2.jpg\n")
    _write(root / "train.de", "eins\nzwei\n")
    _write(root / "val.de", "zwei (val)\n")
    report = _run("multi30k", root, tmp_path / "w")
    assert report.skipped == {"split_conflict": 1} and report.splits == {"train": 2}
    assert report.captions == {"de": 3}                          # the val caption is kept, on the train item
    with pytest.raises(StageInputError, match="no such file"):
        _run("multi30k", root, tmp_path / "w", split_ids=(("test", tmp_path / "absent.txt"),))


def test_coco_id_forms():
    from pipelines.readers import _coco
    assert _coco.parse_image_id("COCO_val2014_000000000042") == ("42", "val2014")
    assert _coco.parse_image_id("train2014_000000000009.jpg") == ("9", "train2014")
    assert _coco.parse_image_id("000000000077") == ("77", None) and _coco.parse_image_id("77") == ("77", None)
    assert _coco.parse_image_id("not-an-id") is None
    assert _coco.file_names("42", "val2014") == ["COCO_val2014_000000000042.jpg", "000000000042.jpg"]
