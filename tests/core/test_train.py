"""Training pieces without a workdir: parameter groups, schedule, checkpoints and RNG, caption
and description preprocessing, CLIP transforms, batch order and rank shards, one loop step."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from leccr_core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from leccr_core.data import (CLIP_MEAN, CLIP_STD, ClipTransform, DataConfig, EpochBatches, MediaLoadError,
                             clean_caption, encode_descriptions, encode_text, pad_views, random_resized_crop_box,
                             resolve_media, sample_rng, uniform_indices)
from leccr_core.losses import total_loss
from leccr_core.train import (TrainConfig, WarmupLinear, make_optimizer, make_scheduler, param_groups,
                              resolve_precision)

from .tiny import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizer
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


# ---- optimiser ------------------------------------------------------------------------------------
def test_param_groups_decay_and_fast_lr(model):
    cfg = TrainConfig(lr=1e-5, weight_decay=0.01)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"base_decay", "base_no_decay", "fast_decay", "fast_no_decay"}
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    # every trainable parameter is in exactly one group
    all_names = [n for g in groups.values() for n in g["param_names"]]
    assert sorted(all_names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    no_decay = names["base_no_decay"] | names["fast_no_decay"]
    assert all(n.endswith(".bias") or "norm" in n.lower() or n in ("tau",) or p.ndim < 2
               for n, p in model.named_parameters() if n in no_decay)
    assert any("LayerNorm" in n or "layer_norm" in n or ".norm." in n for n in no_decay)   # encoder + our norms
    assert {"tau", "text_proj.bias", "visual_proj.bias"} <= names["fast_no_decay"]
    assert names["fast_decay"] == {"text_proj.weight", "visual_proj.weight"}
    assert "slot_queries" in names["base_decay"] and "local_proj.weight" in names["base_decay"]
    assert "vision.visual_projection.weight" in names["base_decay"]          # CLIP's own projection: 1x
    assert groups["fast_decay"]["lr"] == pytest.approx(2e-5) and groups["base_decay"]["lr"] == pytest.approx(1e-5)
    assert groups["base_decay"]["weight_decay"] == 0.01 and groups["fast_no_decay"]["weight_decay"] == 0.0

    opt = make_optimizer(model, cfg)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 for g in opt.param_groups)


def test_weight_decay_touches_only_decay_groups():
    """One AdamW step with zero gradients: only decayed parameters shrink."""
    lin, norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    net = torch.nn.ModuleDict({"text_proj": lin, "norm": norm})
    opt = make_optimizer(net, TrainConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(net.named_parameters())
    # text_proj is a fast group: lr 0.2, decay 0.5 -> factor 1 - 0.1
    assert torch.allclose(after["text_proj.weight"], before["text_proj.weight"] * (1 - 0.2 * 0.5))
    for n in ("text_proj.bias", "norm.weight", "norm.bias"):
        assert torch.equal(after[n], before[n]), n


def test_schedule_warmup_then_linear_decay():
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "tau": torch.nn.Linear(2, 2)})
    opt = make_optimizer(net, TrainConfig(lr=1.0, proj_lr_mult=2.0, fast_lr_params=("tau",)))
    sched = make_scheduler(opt, total_steps=100, warmup_frac=0.1)
    base, fast = [], []
    for _ in range(100):
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        base.append(lrs["base_decay"])
        fast.append(lrs["fast_decay"])
        opt.step()
        sched.step()
    base = np.array(base)
    assert base[0] == pytest.approx(0.1) and base[9] == pytest.approx(1.0)           # warm-up over 10 steps
    assert np.all(np.diff(base[:10]) > 0) and np.all(np.diff(base[10:]) < 0)          # up, then down
    assert np.allclose(np.diff(base[10:]), -1 / 90)                                     # linear to 0
    assert base[-1] == pytest.approx(1 / 90) and base.min() > 0
    assert np.allclose(np.array(fast), 2 * base)                                        # 2x lr throughout
    assert WarmupLinear(100, 10)(100) == 0.0


def test_precision_choice():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError):
        resolve_precision("fp16", torch.device("cpu"))


# ---- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trip_weights_only(tmp_path, model):
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    sched = make_scheduler(opt, 10, 0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched.step()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": [rng_state()], "position": {"epoch": 1, "batch": 2, "step": 7},
             "best": {"rsum": 12.5, "step": 5, "metrics": {"rsum": 12.5}}, "model_config": model.cfg.to_dict(),
             "data_config": DataConfig().to_dict(), "train_config": TrainConfig().to_dict(), "meta": {"lang": "de"}}
    path = save_checkpoint(state, tmp_path / "ck.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))

    raw = torch.load(path, weights_only=True)             # no pickled objects inside
    assert raw["version"] == 1 and raw["position"] == {"epoch": 1, "batch": 2, "step": 7}
    ck = load_checkpoint(path)
    fresh = tiny_model(seed=1)
    assert not torch.equal(fresh.slot_queries, model.slot_queries)
    fresh.load_state_dict(ck["model"])
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    opt2 = make_optimizer(fresh, TrainConfig(lr=1e-3))
    opt2.load_state_dict(ck["optimizer"])
    sched2 = make_scheduler(opt2, 10, 0.1)
    sched2.load_state_dict(ck["scheduler"])
    assert sched2.last_epoch == 1 and [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    k = next(iter(opt.state))
    k2 = next(iter(opt2.state))
    assert torch.equal(opt.state[k]["exp_avg"], opt2.state[k2]["exp_avg"])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(ck["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_checkpoint_refuses_other_files(tmp_path):
    from leccr_core.checkpoint import CheckpointError
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name in ("other.pt", "junk.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)


# ---- text -----------------------------------------------------------------------------------------
def test_clean_caption():
    assert clean_caption("A Dog, running -- on the GRASS!!") == "a dog running on the grass"
    assert clean_caption("Ein «roter» Kreis; über’m Gras.") == "ein roter kreis über m gras"
    long = " ".join(f"w{i}" for i in range(50))
    assert clean_caption(long).split() == [f"w{i}" for i in range(30)]
    assert clean_caption(long, max_words=5) == "w0 w1 w2 w3 w4"
    assert clean_caption(None) == ""


def test_descriptions_truncated_with_specials(tokenizer):
    cfg = DataConfig(desc_max_tokens=200)
    ids = encode_text(tokenizer, " ".join(["dog"] * 500), cfg.desc_max_tokens)
    assert len(ids) == 200 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert encode_text(tokenizer, "", 200) == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert encode_text(tokenizer, "   ", 200)[-1] == tokenizer.sep_token_id


def test_missing_views_are_padding_unless_all_missing(tokenizer):
    cfg = DataConfig(views=("a", "b"))
    cls_sep = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert encode_descriptions(tokenizer, (None, None), cfg) == [cls_sep, []]
    assert encode_descriptions(tokenizer, ("", None), cfg) == [cls_sep, []]
    two = encode_descriptions(tokenizer, ("a dog", None), cfg)
    assert len(two[0]) == 4 and two[1] == []
    ids, mask = pad_views([two, encode_descriptions(tokenizer, (None, "the red ball on grass"), cfg)])
    assert ids.shape == (2, 2, 7) and mask[0, 1].sum() == 0 and mask[1, 0].sum() == 0 and mask[1, 1].sum() == 7
    one_ids, one_mask = pad_views([[[2, 5, 3]], [[2, 3]]])
    assert one_ids.shape == (2, 3) and one_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


# ---- images -------------------------------------------------------------------------------------
def _gradient_image(w=120, h=80):
    x = np.zeros((h, w, 3), dtype=np.uint8)
    x[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    x[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(x)


def test_crop_box_follows_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(400, 300, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and 0 <= top and left + w <= 400 and top + h <= 300
        assert 0.5 * 0.95 <= w * h / (400 * 300) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # an extreme aspect ratio falls back to a centre crop at the nearest allowed ratio
    left, top, w, h = random_resized_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2


def test_clip_transforms():
    cfg = DataConfig(image_size=32)
    image = _gradient_image()
    test = ClipTransform(cfg, train=False)([image])[0]
    assert test.shape == (3, 32, 32)
    ref = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expect = (torch.from_numpy(ref).permute(2, 0, 1) - mean) / std
    assert torch.allclose(test, expect, atol=1e-5)

    train = ClipTransform(cfg, train=True)
    a = train([image], sample_rng(42, 0, 5))
    b = train([image], sample_rng(42, 0, 5))
    c = train([image], sample_rng(42, 1, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)                # per (seed, epoch, sample)
    flips = [train([image], sample_rng(42, 0, i))[0, 0, 16].diff().mean().item() < 0 for i in range(40)]
    assert 5 < sum(flips) < 35                                          # the red ramp reversed: flipped
    frames = train([image, image], sample_rng(1, 0, 0))
    assert frames.shape == (2, 3, 32, 32) and torch.equal(frames[0], frames[1])   # one crop per video
    with pytest.raises(ValueError):
        train([image])


def test_media_paths_stay_inside_root(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "root" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    for rel in ("../secret.jpg", "link.jpg", "/etc/passwd"):
        with pytest.raises(MediaLoadError):
            resolve_media(str(tmp_path / "root"), rel)
    assert resolve_media(str(tmp_path / "root"), "a/../b.jpg") == (tmp_path / "root" / "b.jpg").resolve()


def test_uniform_frame_indices():
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]
    assert uniform_indices(0, 4) == []


# ---- batches ------------------------------------------------------------------------------------
def test_rank_shards_make_the_one_process_batch():
    one = list(EpochBatches(50, 8, seed=42, epoch=3))
    assert len(one) == 6 and all(len(b) == 8 for b in one)                 # 50 // 8, last partial dropped
    assert len({i for b in one for _, i in b}) == 48 and all(e == 3 for b in one for e, _ in b)
    shards = [list(EpochBatches(50, 8, seed=42, epoch=3, rank=r, world=2)) for r in range(2)]
    for b, (s0, s1) in enumerate(zip(*shards)):
        assert s0 + s1 == one[b]
    assert list(EpochBatches(50, 8, seed=42, epoch=3, start=4)) == one[4:]
    assert one != list(EpochBatches(50, 8, seed=42, epoch=4))
    with pytest.raises(ValueError):
        EpochBatches(50, 9, seed=0, epoch=0, world=2)


# ---- one step ---------------------------------------------------------------------------------
def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch():
    from .test_model import image_batch
    model = tiny_model(dropout=0.0)
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    batch = image_batch()
    ids = torch.arange(3)
    losses = []
    for _ in range(5):
        loss, _ = total_loss(model(**batch), ids, model.cfg)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]


# ---- video ----------------------------------------------------------------------------------------
def test_video_frames_load_in_order_and_run_through_the_model(tmp_path):
    from leccr_core.data import ItemRecord, collate_visual, load_visual
    from pipelines.sample_data import make_video       # the project's test-video writer (PyAV)

    frames = np.zeros((10, 48, 64, 3), np.uint8)
    frames[..., 0] = (np.arange(10) * 25)[:, None, None]           # red rises frame by frame
    make_video(tmp_path / "v.mp4", frames, fps=10)
    cfg = DataConfig(image_size=64, video_frames=4)
    item = ItemRecord("v", "video", str(tmp_path), "v.mp4", ("a red ball",))
    x = load_visual(item, cfg, ClipTransform(cfg, train=False))
    assert x.shape == (4, 3, 64, 64)
    assert torch.all(x[:, 0].mean((1, 2)).diff() > 0)                # uniform frames, in order
    train_x = load_visual(item, cfg, ClipTransform(cfg, train=True), sample_rng(0, 0, 0))
    assert train_x.shape == (4, 3, 64, 64)

    (tmp_path / "bad.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(MediaLoadError, match="bad.mp4"):
        load_visual(ItemRecord("b", "video", str(tmp_path), "bad.mp4", (None,)), cfg, ClipTransform(cfg, False))

    visual, mask = collate_visual([x, x[:2]])
    assert visual.shape == (2, 4, 3, 64, 64) and mask.tolist() == [[True] * 4, [True, True, False, False]]
    model = tiny_model(media="video").eval()
    ids, dmask = pad_views([[[2, 5, 3]], [[2, 3]]])
    with torch.no_grad():
        out = model.encode_visual(visual, ids, dmask, mask)
    assert out.v_hat.shape[0] == 2 and torch.isfinite(out.v_hat).all()
