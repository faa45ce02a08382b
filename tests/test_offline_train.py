"""Training offline with local encoders: `make-tiny-model --family clip|bert` builds them, a model
id that is neither a folder nor cached fails at once naming the flag (no retries against an
unreachable hub), and a manifest mixing images and videos trains the images and says so."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest

import schemas
from pipelines import ids, store
from pipelines import train as train_stage
from tests.conftest import run_cli

HUB_ID = "bert-base-multilingual-cased"


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    for family in ("clip", "bert"):
        done = run_cli("make-tiny-model", "--family", family, "--out", root / family)
        assert done.returncode == 0, done.stderr
    return root / "clip", root / "bert"


@pytest.fixture(scope="module")
def mixed_workdir(tmp_path_factory):
    """Sample data with videos (train) and images (train/val/test), Portuguese references,
    and one Portuguese caption per English train caption (rows as translate writes them)."""
    from pipelines import ingest
    from pipelines.sample_data import make_sample_dataset, write_reference_captions
    root = tmp_path_factory.mktemp("mixed")
    data = make_sample_dataset(root / "data", n_images=8, n_videos=2, val_images=3, test_images=2,
                               video_seconds=1.0)
    workdir = root / "wd"
    ingest.run(ingest.IngestConfig(input=data, workdir=workdir, dataset="sample"))
    write_reference_captions(data, workdir, "sample")
    english = store.read_folder(workdir / "captions", schemas.CAPTIONS).to_pylist()
    empty = {f.name: None for f in schemas.CAPTIONS}
    mt = [{**empty, "caption_id": ids.caption_id(c["item_id"], "pt", f"mt:{c['caption_id']}"), "item_id": c["item_id"],
           "split": c["split"], "lang": "pt", "text": "tradução de " + c["text"], "origin": "mt",
           "source_caption_id": c["caption_id"], "source_lang": "en", "quality_flags": []}
          for c in english if c["lang"] == "en" and c["split"] == "train"]
    store.write_atomic(pa.Table.from_pylist(mt, schema=schemas.CAPTIONS), workdir / "captions" / "mt-pt-test.parquet")
    return workdir


def test_tiny_encoders_are_local_model_folders(encoders):
    from transformers import AutoConfig, AutoTokenizer
    clip, bert = encoders
    assert AutoConfig.from_pretrained(clip).projection_dim == 64
    tokenizer = AutoTokenizer.from_pretrained(bert)
    ids_ = tokenizer("Ein Hund läuft am Strand")["input_ids"]
    assert tokenizer.unk_token_id not in ids_                      # words of the built-in corpus are whole
    # rebuilding the same folder reuses it; another family there is refused
    again = run_cli("make-tiny-model", "--family", "bert", "--out", bert)
    assert again.returncode == 0 and again.stdout.strip() == str(bert)
    clash = run_cli("make-tiny-model", "--family", "clip", "--out", bert)
    assert clash.returncode == 2 and "another tiny model" in clash.stderr


def test_bert_vocab_from_a_workdir(mixed_workdir, tmp_path):
    done = run_cli("make-tiny-model", "--family", "bert", "--out", tmp_path / "b", "--vocab-from", mixed_workdir)
    assert done.returncode == 0, done.stderr
    vocab = set((tmp_path / "b" / "vocab.txt").read_text(encoding="utf-8").split())
    assert {"traducao", "fundo", "circle"} <= vocab                # English, Portuguese (accents stripped)
    bad = run_cli("make-tiny-model", "--family", "clip", "--out", tmp_path / "c", "--vocab-from", mixed_workdir)
    assert bad.returncode == 2 and "--vocab-from is for --family bert" in bad.stderr


def _train_args(workdir, clip, bert, *extra):
    return ["train", "--workdir", workdir, "--lang", "pt", "--vision-model", clip, "--text-model", bert,
            "--image-size", "64", "--set", "embed_dim=16", "--ablate", "descriptions", "--max-steps", "2",
            "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--threads", "1", "--no-progress", *extra]


@pytest.mark.parametrize("offline", [False, True])
def test_uncached_hub_id_fails_at_once_naming_the_flag(mixed_workdir, encoders, tmp_path, offline):
    clip, _ = encoders
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1" if offline else "0"}
    started = time.monotonic()
    done = run_cli(*_train_args(mixed_workdir, clip, HUB_ID, "--run-name", f"hub-{offline}"), env=env)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert f"--text-model {HUB_ID}" in done.stderr and "not in the Hugging Face cache" in done.stderr
    assert "make-tiny-model --family bert" in done.stderr          # how to get a local one
    assert ("HF_HUB_OFFLINE" if offline else "cannot be reached") in done.stderr
    assert elapsed < 20, elapsed                                   # one probe, no retry loop (was 25 s + load)
    assert not (mixed_workdir / "checkpoints" / f"hub-{offline}").exists()


def test_missing_local_folder_names_the_flag(mixed_workdir, encoders, tmp_path):
    _, bert = encoders
    done = run_cli(*_train_args(mixed_workdir, tmp_path / "no" / "such" / "clip", bert, "--run-name", "nofolder"))
    assert done.returncode == 2 and "--vision-model" in done.stderr and "no such model folder" in done.stderr


def test_mixed_manifest_trains_the_images_and_says_so(mixed_workdir, encoders, tmp_path):
    clip, bert = encoders
    report = tmp_path / "train.json"
    done = run_cli(*_train_args(mixed_workdir, clip, bert, "--run-name", "mixed", "--report-json", report))
    assert done.returncode == 0, done.stderr
    summary = json.loads(report.read_text())
    assert summary["media"] == "image" and summary["train_items"] == 8
    assert summary["skipped"]["other_media:video"] == 2
    assert any("mixes images" in n and "--media video" in n for n in summary["notes"])
    assert "mixes images" in done.stderr.replace("\n", " ").replace("│", "")
    assert summary["val_captions"] == 6 and summary["summary"]["finished"]
    # --media video picks the videos instead
    video = train_stage.load_train_data(train_stage.TrainStageConfig(workdir=mixed_workdir, lang="pt", media="video",
                                                                     ablate=("descriptions",), val_split=None))
    assert video.media == "video" and len(video.items) == 2 and not video.notes
