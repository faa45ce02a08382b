"""The train and evaluate stages on a small synthetic German workdir with tiny encoders:
exact resume across processes, the CLI end to end (metrics JSON and ranks Parquet read back),
clear errors for unusable input, and Ray Train with two gloo workers against one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import schemas
from pipelines import store
from pipelines import train as train_stage
from pipelines.synthetic import build_tiny_encoders, make_synthetic_workdir, workdir_texts
from tests.conftest import run_cli

N_TRAIN, N_VAL, N_TEST = 16, 6, 8           # 2 captions per item: 32 train pairs, 4 batches of 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-stage")
    workdir = root / "wd"
    make_synthetic_workdir(workdir, N_TRAIN, N_VAL, N_TEST)
    vision, text = build_tiny_encoders(root / "enc", workdir_texts(workdir), width=32, layers=1, image_size=32)
    return workdir, vision, text


def model_overrides(vision, text, **extra) -> dict:
    return {"vision_model": str(vision), "text_model": str(text), "image_size": 32, "embed_dim": 16, **extra}


def train_cfg(**kw):
    from leccr_core.train import TrainConfig
    return TrainConfig(**{**dict(epochs=2, max_steps=7, batch_size=8, lr=1e-3, num_workers=0, threads=1), **kw})


def stage_cfg(synth, run_name, train=None, model=None, **kw) -> train_stage.TrainStageConfig:
    workdir, vision, text = synth
    return train_stage.TrainStageConfig(workdir=workdir, lang="de", model=model_overrides(vision, text, **(model or {})),
                                        train=train or train_cfg(), run_name=run_name, progress=False,
                                        **kw)


def steps(log_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (log_dir / "train.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r]


def cli_train_args(synth, run_name, *extra) -> list[str]:
    workdir, vision, text = synth
    return ["train", "--workdir", workdir, "--lang", "de", "--vision-model", vision, "--text-model", text,
            "--image-size", "32", "--set", "embed_dim=16", "--epochs", "2", "--max-steps", "7", "--batch-size", "8",
            "--lr", "1e-3", "--num-workers", "0", "--threads", "1", "--run-name", run_name, "--no-progress", *extra]


# ---- data reading -------------------------------------------------------------------------------
def test_workdir_becomes_pairs_and_val_captions(synth):
    data = train_stage.load_train_data(stage_cfg(synth, "x"))
    assert data.media == "image" and data.views == ("detailed",)           # default view
    assert len(data.items) == N_TRAIN and len(data.pairs) == 2 * N_TRAIN
    assert all(p.src and p.tgt and p.src != p.tgt for p in data.pairs)
    assert {p.item for p in data.pairs} == set(range(N_TRAIN))
    assert len(data.val.items) == N_VAL and len(data.val.captions) == 2 * N_VAL
    # validation queries are the human German captions, not the English ones nor translations
    human_de = {r["text"] for r in store.read_folder(synth[0] / "captions", schemas.CAPTIONS).to_pylist()
                if r["origin"] == "human" and r["lang"] == "de"}
    assert {c.text for c in data.val.captions} <= human_de
    assert all(it.descriptions[0].startswith("The image shows") for it in data.items)
    two = train_stage.load_train_data(stage_cfg(synth, "x", views=("objects", "detailed")))
    assert two.views == ("objects", "detailed") and two.items[0].descriptions[0].startswith("Objects:")


# ---- exact resume -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_and_resumed(synth):
    """7 steps straight; 5 steps then a resume in a new process (the CLI) to 7."""
    straight = train_stage.run(stage_cfg(synth, "straight"))
    first = train_stage.run(stage_cfg(synth, "resumed", train=train_cfg(stop_after_steps=5)))
    assert first.summary["steps"] == 5 and first.summary["stopped_early"]
    out = run_cli(*cli_train_args(synth, "resumed", "--resume", "--report-json", synth[0] / "resumed-report.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((synth[0] / "resumed-report.json").read_text())
    return straight, resumed


def test_resume_replays_the_same_steps(straight_and_resumed, synth):
    straight, resumed = straight_and_resumed
    assert resumed["summary"]["resumed_from_step"] == 5 and resumed["summary"]["steps"] == 7
    a, b = steps(Path(straight.log_dir)), steps(Path(resumed["log_dir"]))
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        for key in ("loss", "itc_vs", "itc_vt", "kl", "cv", "reg", "tau", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)           # bit-identical, dropout included
    assert len({r["loss"] for r in a}) == 7                        # the losses do change
    from leccr_core.checkpoint import load_checkpoint
    wa = load_checkpoint(Path(straight.run_dir) / "last.pt")
    wb = load_checkpoint(Path(resumed["run_dir"]) / "last.pt")
    assert wa["position"] == wb["position"] == {"epoch": 1, "batch": 3, "step": 7}
    for name, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][name]), name
    evals = lambda d: [json.loads(x) for x in (Path(d) / "train.jsonl").read_text().splitlines()  # noqa: E731
                       if '"event": "eval"' in x]
    assert [e["rsum"] for e in evals(straight.log_dir)] == [e["rsum"] for e in evals(resumed["log_dir"])]
    assert [e["step"] for e in evals(straight.log_dir)] == [4, 7]      # every epoch and at the end


def test_summary_and_checkpoints(straight_and_resumed):
    straight, _ = straight_and_resumed
    s = straight.summary
    assert s["finished"] and s["steps"] == s["steps_total"] == 7 and s["precision"] == "fp32"
    assert s["best_step"] in (4, 7) and s["best_val_rsum"] is not None
    assert Path(s["checkpoint_best"]).is_file() and Path(s["checkpoint_last"]).is_file()
    assert s["tensorboard"] is True                        # installed with the train extra: curves logged
    assert any((Path(straight.log_dir) / "tensorboard").glob("events.out.tfevents.*"))
    best = torch.load(s["checkpoint_best"], weights_only=True)
    assert best["position"]["step"] == s["best_step"] and best["best"]["rsum"] == s["best_val_rsum"]
    assert best["meta"]["lang"] == "de" and list(best["data_config"]["views"]) == ["detailed"]
    assert {"model", "optimizer", "scheduler", "rng", "position"} <= set(best)


# ---- CLI end to end -------------------------------------------------------------------------------
def test_cli_evaluate_writes_metrics_and_ranks(straight_and_resumed, synth):
    workdir = synth[0]
    _, resumed = straight_and_resumed
    ckpt = Path(resumed["run_dir"]) / "best.pt"
    out = run_cli("evaluate", "--workdir", workdir, "--checkpoint", ckpt, "--lang", "de", "--split", "test",
                  "--fusion-weight", "0.1", "--num-workers", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((workdir / "eval" / "de-test-best.json").read_text())
    assert metrics["split"] == "test" and metrics["fusion_weight"] == 0.1 and metrics["items"] == N_TEST
    assert metrics["captions"] == 2 * N_TEST and json.loads(out.stdout)["rsum"] == metrics["metrics"]["rsum"]
    table = pq.read_table(workdir / "eval" / "de-test-best-ranks.parquet")
    assert table.schema.names == ["query_id", "direction", "rank", "item_id"]
    rows = table.to_pylist()
    t2v = [r for r in rows if r["direction"] == "t2v"]
    v2t = [r for r in rows if r["direction"] == "v2t"]
    assert len(t2v) == 2 * N_TEST and len(v2t) == N_TEST
    assert all(1 <= r["rank"] <= N_TEST for r in t2v) and all(1 <= r["rank"] <= 2 * N_TEST for r in v2t)
    human = {r["caption_id"]: r for r in store.read_folder(workdir / "captions", schemas.CAPTIONS).to_pylist()}
    assert all(human[r["query_id"]]["item_id"] == r["item_id"] and human[r["query_id"]]["split"] == "test"
               for r in t2v)
    m = metrics["metrics"]
    assert m["t2v_r1"] == pytest.approx(100 * sum(r["rank"] == 1 for r in t2v) / len(t2v))
    assert m["v2t_r5"] == pytest.approx(100 * sum(r["rank"] <= 5 for r in v2t) / len(v2t))

    again = run_cli(*cli_train_args(synth, "resumed"))           # neither --resume nor --overwrite
    assert again.returncode == 2 and "--resume" in again.stderr


# ---- unusable input ---------------------------------------------------------------------------
def _copy_workdir(synth, tmp_path) -> Path:
    dst = tmp_path / "wd"
    for sub in ("manifest", "captions", "descriptions"):
        shutil.copytree(synth[0] / sub, dst / sub)
    return dst


def _error(synth, workdir, **kw) -> str:
    cfg = stage_cfg(synth, "err", **kw)
    cfg.workdir = workdir
    with pytest.raises(store.StageInputError) as err:
        train_stage.run(cfg)
    return str(err.value)


def test_missing_descriptions_and_translations(synth, tmp_path):
    wd = _copy_workdir(synth, tmp_path)
    shutil.rmtree(wd / "descriptions")
    assert "no descriptions" in _error(synth, wd) and "describe" in _error(synth, wd)
    wd2 = _copy_workdir(synth, tmp_path / "b")
    (wd2 / "captions" / "mt-de-synthetic.parquet").unlink()
    msg = _error(synth, wd2)
    assert "no machine-translated 'de' captions" in msg and "translate" in msg
    shutil.rmtree(wd2 / "manifest")
    assert "no manifest" in _error(synth, wd2)


def test_empty_splits_and_unknown_views(synth, tmp_path):
    assert "split 'nope' has no usable image items" in _error(synth, synth[0], train_split="nope")
    msg = _error(synth, synth[0], val_split="nope")
    assert "validation split 'nope'" in msg and "'train' (16)" in msg and "--val-split none" in msg
    assert "available: detailed, empty, objects" in _error(synth, synth[0], views=("scene",))


def test_schema_mismatch_names_the_column(synth, tmp_path):
    wd = _copy_workdir(synth, tmp_path)
    table = pq.read_table(wd / "descriptions" / "part-synthetic.parquet").drop_columns(["view"])
    pq.write_table(table, wd / "descriptions" / "part-synthetic.parquet")
    assert "missing column 'view'" in _error(synth, wd)


def test_bad_model_settings(synth):
    assert "unknown preset" in _error(synth, synth[0], preset="multi30k-xx")
    assert "model config" in _error(synth, synth[0], model={"no_such_field": 1})


def test_cli_exit_2_on_missing_stage(synth, tmp_path):
    wd = _copy_workdir(synth, tmp_path)
    shutil.rmtree(wd / "descriptions")
    args = cli_train_args(synth, "x")
    args[args.index("--workdir") + 1] = wd
    out = run_cli(*args)
    assert out.returncode == 2 and "no descriptions" in out.stderr and "Traceback" not in out.stderr
    ev = run_cli("evaluate", "--workdir", wd, "--lang", "de")
    assert ev.returncode == 2 and "no checkpoint" in ev.stderr


# ---- Ray Train -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_train_two_gloo_workers_match_one_process(synth, monkeypatch):
    """Same global batch of 8: 2 DDP ranks x 4 rows (gloo) vs 1 process x 8 rows. With dropout
    off and the per-rank L_loc term off (w_cap = 0; every other term is gathered, or a mean that
    averages exactly over equal shards), both optimise the same objective: the rank-averaged
    per-step losses and the final weights must agree."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    workdir, vision, text = synth
    same = dict(model=model_overrides(vision, text, dropout=0.0, w_cap=0.0), val_split=None)
    tc = train_cfg(max_steps=4, epochs=1)
    one = train_stage.run(train_stage.TrainStageConfig(workdir=workdir, lang="de", train=tc, run_name="one",
                                                       progress=False, **same))
    two = train_stage.run(train_stage.TrainStageConfig(workdir=workdir, lang="de", train=tc, run_name="two",
                                                       workers=2, progress=False, **same))
    assert two.summary["world_size"] == 2 and two.summary["steps"] == 4
    a, b = steps(Path(one.log_dir)), steps(Path(two.log_dir))
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss", "itc_vs", "itc_vt", "kl", "itc_st", "cv", "reg", "tau"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert len({r["loss"] for r in a}) == 4
    from leccr_core.checkpoint import load_checkpoint
    wa = load_checkpoint(Path(one.run_dir) / "last.pt")["model"]
    wb = load_checkpoint(Path(two.run_dir) / "last.pt")
    assert len(wb["rng"]) == 2                                     # one RNG state per rank
    compared = 0
    for name, tensor in wa.items():
        other = wb["model"][name]
        if name.endswith(("k_proj.bias", "key.bias")):
            continue        # softmax is shift-invariant: key biases get rounding noise, which Adam amplifies
        if name.endswith("in_proj_bias"):                        # nn.MultiheadAttention: [q; k; v] biases
            d = tensor.shape[0] // 3
            tensor, other = torch.cat([tensor[:d], tensor[2 * d:]]), torch.cat([other[:d], other[2 * d:]])
        assert torch.allclose(tensor, other, atol=1e-5, rtol=1e-4), name
        compared += 1
    assert compared > 100


# ---- description-feature cache -----------------------------------------------------------------
def test_cached_description_features_train_and_evaluate(synth):
    import numpy as np
    from transformers import AutoModel, AutoTokenizer

    from leccr_core.data import DataConfig, DescFeatureCache, encode_descriptions, pad
    from pipelines import evaluate as evaluate_stage
    workdir, _, text = synth
    rep = train_stage.run(stage_cfg(synth, "cached", train=train_cfg(max_steps=2, cache_desc_features=True)))
    assert rep.summary["finished"]
    caches = {DescFeatureCache(p).index.shape[0]: DescFeatureCache(p) for p in (workdir / "cache").glob("desc-*")}
    assert set(caches) == {N_TRAIN, N_VAL}                      # train and val items
    data = train_stage.load_train_data(stage_cfg(synth, "cached"))
    tok, enc = AutoTokenizer.from_pretrained(text), AutoModel.from_pretrained(text).eval()
    seq = encode_descriptions(tok, data.items[3].descriptions, DataConfig())[0]
    with torch.no_grad():
        ref = enc(*pad([seq])).last_hidden_state[0]
    got = caches[N_TRAIN].item(3)[0]
    assert got.shape == ref.shape and np.allclose(got.numpy(), ref.numpy(), atol=1e-2)   # float16 storage
    ev = evaluate_stage.run(evaluate_stage.EvaluateConfig(workdir=workdir, lang="de", split="test", num_workers=0,
                                                          checkpoint=Path(rep.run_dir) / "last.pt", name="cached"))
    assert ev.items == N_TEST and (workdir / "eval" / "cached.json").is_file()
    assert not list((workdir / "eval").glob(".desc-cache/*"))   # the evaluation's cache is removed


# ---- the release's video setting: per-video feature arrays ---------------------------------------
FEAT_D = 24


@pytest.fixture(scope="module")
def video_synth(synth, tmp_path_factory):
    """The synthetic workdir as a video dataset whose videos are all missing (error rows in the
    manifest, as import-benchmark writes them): training needs only the features, matched by
    the native video id. Every item but one has features: as .npy files and as Parquet."""
    import numpy as np
    root = tmp_path_factory.mktemp("video-features")
    wd = root / "wd"
    for sub in ("captions", "descriptions"):
        shutil.copytree(synth[0] / sub, wd / sub)
    rows = store.read_folder(synth[0] / "manifest", schemas.MANIFEST).to_pylist()
    for k, r in enumerate(rows):
        r.update(media_type="video", relpath=f"videos/{k}.mp4", source_id=f"vid{k:03d}", error_kind="not_found",
                 error="no such file")
    store.write_atomic(pa.Table.from_pylist(rows, schema=schemas.MANIFEST), wd / "manifest" / "manifest.parquet")
    g = np.random.default_rng(0)
    feats = {r["source_id"]: g.standard_normal((2 + k % 4, FEAT_D)).astype(np.float32) for k, r in enumerate(rows)}
    missing = next(r["source_id"] for r in rows if r["split"] == "train")
    del feats[missing]
    (root / "npy").mkdir()
    for vid, arr in feats.items():
        np.save(root / "npy" / f"{vid}.npy", arr)
    (root / "pq").mkdir()
    items = sorted(feats.items())
    for part, chunk in enumerate((items[::2], items[1::2])):
        pq.write_table(pa.table({"video_id": [v for v, _ in chunk], "features": [a.tolist() for _, a in chunk]}),
                       root / "pq" / f"part-{part}.parquet")
    return wd, root / "npy", root / "pq"


def test_video_features_release_preset_from_the_cli(synth, video_synth):
    """--preset release-vatex-zh --video-features DIR: every release setting lands in the run;
    an explicit flag still wins over the preset; .npy and Parquet features train the same run."""
    wd, npy, pq_dir = video_synth
    args = cli_train_args(synth, "rel-npy", "--preset", "release-vatex-zh", "--video-features", npy,
                          "--grad-clip", "0.5", "--max-steps", "3", "--val-split", "none")
    args[args.index("--workdir") + 1] = wd
    i = args.index("--epochs")                                # the preset's epochs
    del args[i:i + 2]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = torch.load(wd / "checkpoints" / "rel-npy" / "last.pt", weights_only=True)
    mc, tc = ckpt["model_config"], ckpt["train_config"]
    assert (mc["media"], mc["video_input"], mc["d"], mc["n_frame_layers"], mc["n_slots"]) == (
        "video", "features", FEAT_D, 1, 2)
    assert (mc["cv_norm"], mc["cv_batch"], mc["slot_init"], mc["kl_orientation"], mc["gather_grad"]) == (
        "release", "rank", "zeros", "release", "local")
    assert (tc["epochs"], tc["proj_lr_mult"], tc["precision"], tc["grad_clip"]) == (50, 1.0, "fp32", 0.5)
    assert not any(k.startswith("vision.") for k in ckpt["model"])
    assert torch.count_nonzero(ckpt["model"]["slot_queries"]) > 0          # zero-init, then trained
    assert ckpt["meta"]["skipped"]["no_video_features"] == 1           # the item without features

    from pipelines import evaluate as evaluate_stage
    same = dict(max_steps=3, batch_size=8, lr=1e-3, num_workers=0, threads=1, grad_clip=0.5)   # as the CLI's
    cfg = stage_cfg(synth, "rel-pq", train=same, preset="release-vatex-zh", val_split=None, video_features=pq_dir)
    cfg.workdir = wd
    rep = train_stage.run(cfg)
    assert rep.train_items == N_TRAIN - 1 and rep.skipped["no_video_features"] == 1
    a, b = steps(wd / "logs" / "train-rel-npy"), steps(Path(rep.log_dir))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)   # same features by id
    ev = evaluate_stage.run(evaluate_stage.EvaluateConfig(workdir=wd, lang="de", split="test", num_workers=0,
                                                          checkpoint=Path(rep.run_dir) / "last.pt", name="pq"))
    assert ev.items == N_TEST and ev.fusion_weight == 0.1                # the release's video fusion


def test_video_features_errors(synth, video_synth, tmp_path):
    wd, npy, _ = video_synth
    cfg = stage_cfg(synth, "err", preset="release-msrvtt-cn")
    cfg.workdir = wd
    assert "--video-features" in _error_cfg(cfg)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"name": ["x"]}), bad / "f.parquet")
    cfg.video_features = bad
    assert "video_id" in _error_cfg(cfg)
    cfg.video_features, cfg.model = npy, {**cfg.model, "d": 512}
    assert "24-d" in _error_cfg(cfg)


def _error_cfg(cfg) -> str:
    with pytest.raises(store.StageInputError) as err:
        train_stage.run(cfg)
    return str(err.value)


# ---- ablations ----------------------------------------------------------------------------------
def test_ablate_slots_trains_without_descriptions_and_evaluates_global_only(synth, tmp_path):
    wd = _copy_workdir(synth, tmp_path)
    shutil.rmtree(wd / "descriptions")                        # no description input: none needed
    cfg = stage_cfg(synth, "no-slots", train=train_cfg(max_steps=2), ablate=("slots",))
    cfg.workdir = wd
    rep = train_stage.run(cfg)
    assert rep.views == () and rep.summary["ablate"] == ["slots"]
    assert set(rep.summary["loss_terms"]) == {"itc_vs", "itc_vt", "itc_st", "kl"}
    from pipelines import evaluate as evaluate_stage
    ck = Path(rep.run_dir) / "last.pt"
    ev = evaluate_stage.run(evaluate_stage.EvaluateConfig(workdir=wd, lang="de", split="test", num_workers=0,
                                                          checkpoint=ck, name="ns"))
    assert ev.fusion_weight == 0.0 and json.loads((wd / "eval" / "ns.json").read_text())["ablate"] == ["slots"]
    with pytest.raises(store.StageInputError, match="local branch is ablated"):
        evaluate_stage.run(evaluate_stage.EvaluateConfig(workdir=wd, lang="de", split="test", num_workers=0,
                                                         checkpoint=ck, fusion_weight=0.1))


@pytest.mark.slow
def test_every_ablation_trains_under_two_rank_ddp(synth, monkeypatch):
    """One Ray Train worker group (2 gloo ranks) runs every ablation (and the release preset)
    for 2 steps each: DDP fails on a second step if any parameter got no gradient. Each run
    records its ablation and trains a different set of parameters and loss terms."""
    from leccr_core.config import ABLATIONS
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    variants = {"full": {}, **{name: {"ablate": (name,)} for name in ABLATIONS},
                "release": {"preset": "release-multi30k-fr",     # the preset's train side: 1x lr, no clipping, fp32
                            "train": dict(max_steps=2, epochs=1, batch_size=8, lr=1e-3, num_workers=0, threads=1)}}
    jobs = {}
    for name, kw in variants.items():
        cfg = stage_cfg(synth, f"ddp-{name}", workers=2, val_split=None,
                        **{"train": train_cfg(max_steps=2, epochs=1), **kw})
        shutil.rmtree(cfg.workdir / "checkpoints" / cfg.run, ignore_errors=True)
        shutil.rmtree(cfg.workdir / "logs" / f"train-{cfg.run}", ignore_errors=True)
        jobs[name] = train_stage.prepare(cfg).job
    summaries = dict(zip(jobs, train_stage.train_with_ray(stage_cfg(synth, "ddp", workers=2), list(jobs.values()))))
    names, terms = {}, {}
    for name, job in jobs.items():
        s = summaries[name]
        assert s["world_size"] == 2 and s["steps"] == 2 and s["finished"], name
        ckpt = torch.load(job.run_dir / "last.pt", weights_only=True)
        assert ckpt["model_config"]["ablate"] == list(variants[name].get("ablate", ())) == s["ablate"]
        names[name] = frozenset(ckpt["model"])
        terms[name] = frozenset(s["loss_terms"])
        assert all(r["loss"] == r["loss"] for r in steps(job.log_dir))             # finite, not NaN
    assert ckpt["model_config"]["cv_norm"] == "release" and ckpt["train_config"]["proj_lr_mult"] == 1.0
    for name in ABLATIONS:                                      # each changes what is trained
        assert (names[name], terms[name]) != (names["full"], terms["full"]), name
    assert not any(n.startswith(("slot_queries", "desc_proj", "local_proj")) for n in names["slots"])
    assert any(n.startswith("slot_queries") for n in names["descriptions"])
    assert not any(n.startswith("desc_proj") for n in names["descriptions"])
    assert "kl" not in terms["softened"] and {"loc_s", "loc_t"}.isdisjoint(terms["local"])
    assert "cv" not in terms["cv"] and "reg" not in terms["reg"] and names["reg"] == names["full"]
