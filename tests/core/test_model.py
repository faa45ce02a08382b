"""LeccrModel on tiny random encoders: shapes, masks, slots, gradients, config."""

from __future__ import annotations

import pytest
import torch

from leccr_core.config import BENCHMARK_PRESETS, LeccrConfig, resolve_preset
from leccr_core.losses import total_loss
from leccr_core.model import CrossAttentionLayer, LeccrModel

from .tiny import D, EMB, tiny_bert, tiny_cfg, tiny_clip, tiny_model, tokens

B = 3
ATOL = 1e-5


@pytest.fixture(scope="module")
def image_model():
    return tiny_model().eval()


def image_batch(B=B, seed=0, desc_lengths=(9, 5, 7), L=12):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, 64, 64, generator=g)
    d_ids, d_mask = tokens(B, L, seed + 1, desc_lengths[:B])
    s_ids, s_mask = tokens(B, 8, seed + 2, [8, 6, 4][:B])
    t_ids, t_mask = tokens(B, 8, seed + 3, [5, 8, 3][:B])
    return dict(visual=pixels, desc_ids=d_ids, desc_mask=d_mask, src_ids=s_ids, src_mask=s_mask,
                tgt_ids=t_ids, tgt_mask=t_mask)


# ---- the block ----------------------------------------------------------------------------------
def test_cross_attention_layer_is_post_norm_with_query_residual():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(16, 8, 0.1).eval()
    x, mem = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    a, _ = layer.attn(x, mem, mem, need_weights=False)
    expected = layer.norm(x + layer.w2(torch.nn.functional.gelu(layer.w1(a))))  # no residual around a
    assert torch.allclose(layer(x, mem), expected, atol=1e-6)


def test_cross_attention_layer_ignores_padded_memory():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(16, 8, 0.1).eval()
    x, mem = torch.randn(1, 3, 16), torch.randn(1, 5, 16)
    padded = torch.cat([mem, 50 * torch.randn(1, 4, 16)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    assert torch.allclose(layer(x, mem), layer(x, padded, mask), atol=ATOL)


# ---- images ---------------------------------------------------------------------------------------
def test_image_shapes_and_norms(image_model):
    with torch.no_grad():
        out = image_model(**image_batch())
    N, K = 1 + (64 // 16) ** 2, 4   # tiny CLIP at 64 px / patch 16 after position resize
    assert out.z_v.shape == out.z_v_hat.shape == out.cv_tokens.shape == (B, N, D)
    assert out.slots.shape == out.m_local.shape == out.cv_slots.shape == (B, K, D)
    assert out.m_hat.shape == (B, K, EMB) and out.v_hat.shape == out.h_s.shape == out.h_t.shape == (B, EMB)
    for h in (out.v_hat, out.h_s, out.h_t):
        assert torch.allclose(h.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert out.visual_mask is None
    assert not torch.allclose(out.m_hat.norm(dim=-1), torch.ones(B, K), atol=1e-3)  # not normalised


def test_z_v_is_every_token_through_post_layernorm_and_projection(image_model):
    pixels = image_batch()["visual"]
    with torch.no_grad():
        z = image_model.clip_tokens(pixels)
        ref = image_model.vision(pixel_values=pixels)   # HF's CLS path: post LN + projection
    assert torch.allclose(z[:, 0], ref.image_embeds, atol=1e-5)


def test_padding_does_not_change_outputs(image_model):
    b = image_batch()
    extra = lambda ids: torch.cat([ids, torch.zeros(B, 6, dtype=ids.dtype)], 1)  # noqa: E731
    padded = {**b, **{k: extra(b[k]) for k in ("desc_ids", "desc_mask", "src_ids", "src_mask", "tgt_ids", "tgt_mask")}}
    with torch.no_grad():
        o1, o2 = image_model(**b), image_model(**padded)
    for name in ("slots", "m_hat", "v_hat", "h_s", "h_t"):
        assert torch.allclose(getattr(o1, name), getattr(o2, name), atol=ATOL), name


def test_descriptions_are_truncated_to_max_tokens():
    model = tiny_model(desc_max_tokens=6).eval()
    b = image_batch(desc_lengths=(12, 12, 12))
    short = {**b, "desc_ids": b["desc_ids"][:, :6], "desc_mask": b["desc_mask"][:, :6]}
    with torch.no_grad():
        assert torch.allclose(model(**b).slots, model(**short).slots, atol=ATOL)
        feats = model.encode_descriptions(b["desc_ids"], b["desc_mask"])
        assert feats.shape[1] == 6
        via_feats = model.encode_visual(b["visual"], desc_feats=model.encode_descriptions(
            b["desc_ids"], b["desc_mask"]), desc_mask=b["desc_mask"])
    assert torch.allclose(via_feats.slots, model(**short).slots, atol=ATOL)


def test_one_view_equals_plain_descriptions_in_both_modes():
    for mode in ("concat", "mean"):
        model = tiny_model(desc_views=mode).eval()
        b = image_batch()
        views = {**b, "desc_ids": b["desc_ids"][:, None], "desc_mask": b["desc_mask"][:, None]}
        with torch.no_grad():
            assert torch.allclose(model(**b).slots, model(**views).slots, atol=ATOL), mode


def test_several_views():
    b = image_batch()
    d2_ids, d2_mask = tokens(B, 12, 9, [4, 12, 1])
    d2_mask[2] = 0                                          # item 2 has no second view
    ids = torch.stack([b["desc_ids"], d2_ids], 1)           # [B, 2, L]
    mask = torch.stack([b["desc_mask"], d2_mask], 1)
    mean_model = tiny_model(desc_views="mean").eval()
    with torch.no_grad():
        two = mean_model(**{**b, "desc_ids": ids, "desc_mask": mask}).slots
        first = mean_model(**b).slots
        second = mean_model(**{k: v[:2] for k, v in {**b, "desc_ids": d2_ids, "desc_mask": d2_mask}.items()}).slots
    assert torch.allclose(two[:2], (first[:2] + second[:2]) / 2, atol=ATOL)   # average of views
    assert torch.allclose(two[2], first[2], atol=ATOL)                         # missing view skipped
    concat_model = tiny_model(desc_views="concat").eval()
    with torch.no_grad():
        cat = concat_model(**{**b, "desc_ids": ids, "desc_mask": mask}).slots
        single = concat_model(**b).slots
    assert torch.isfinite(cat).all() and cat.shape == (B, 4, D)
    assert torch.allclose(cat[2], single[2], atol=ATOL)     # an all-padding view adds nothing
    assert not torch.allclose(cat[0], single[0], atol=1e-3)


def test_slot_symmetry_zero_init_vs_random():
    b = image_batch()
    zero = tiny_model(slot_init="zeros").eval()
    rand = tiny_model(slot_init="random").eval()
    with torch.no_grad():
        sz, sr = zero(**b).slots, rand(**b).slots
    assert torch.allclose(sz, sz[:, :1].expand_as(sz), atol=1e-6)       # all K slots identical
    assert (sr - sr[:, :1]).abs().amax() > 1e-4                           # random init breaks it


# ---- video ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("video_input", ["clip_frames", "features"])
def test_video_padded_frames_do_not_change_outputs(video_input):
    model = tiny_model(media="video", video_input=video_input).eval()
    assert model.cfg.n_slots == 2 and model.cfg.n_slot_layers == 2 and model.cfg.fusion_weight == 0.1
    g = torch.Generator().manual_seed(3)
    shape = (2, 5, 3, 64, 64) if video_input == "clip_frames" else (2, 5, D)
    frames = torch.randn(*shape, generator=g)
    n_frames = [3, 5]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = frames.clone()
    garbage[0, 3:] = 1e3                                   # padded frames hold junk
    d_ids, d_mask = tokens(2, 10, 4, [10, 6])
    s_ids, s_mask = tokens(2, 6, 5)
    with torch.no_grad():
        out = model(garbage, d_ids, d_mask, s_ids, s_mask, visual_mask=mask)
        for b, n in enumerate(n_frames):                   # each video alone, unpadded
            alone = model(frames[b:b + 1, :n], d_ids[b:b + 1], d_mask[b:b + 1], s_ids[b:b + 1], s_mask[b:b + 1])
            for name in ("v_hat", "m_hat", "slots"):
                assert torch.allclose(getattr(out, name)[b], getattr(alone, name)[0], atol=ATOL), (name, b)
            assert torch.allclose(out.z_v[b, :n], alone.z_v[0], atol=ATOL)
    assert out.z_v.shape == (2, 5, D) and out.m_hat.shape == (2, 2, EMB)
    assert out.visual_mask.dtype == torch.bool


# ---- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("media", ["image", "video"])
def test_every_parameter_gets_a_gradient(media):
    model = tiny_model(media=media).train()
    b = image_batch()
    if media == "video":
        b["visual"] = torch.randn(B, 2, 3, 64, 64)
        b["visual_mask"] = torch.tensor([[1, 1], [1, 0], [1, 1]])
    loss, parts = total_loss(model(**b), torch.tensor([0, 1, 0]), model.cfg)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.tau.grad.abs() > 0 and model.slot_queries.grad.abs().sum() > 0


@pytest.mark.parametrize("no_grad", [True, False])
def test_description_path_gradient(no_grad):
    model = tiny_model(desc_no_grad=no_grad).train()
    b = image_batch()
    out = model.encode_visual(b["visual"], b["desc_ids"], b["desc_mask"])
    out.slots.sum().backward()                       # depends on descriptions, not on captions
    bert_grads = [p.grad for p in model.text.parameters() if p.grad is not None]
    assert model.desc_proj.weight.grad is not None
    assert (len(bert_grads) == 0) == no_grad


def test_tau_is_clamped_and_learnable():
    model = tiny_model()
    assert model.tau.item() == pytest.approx(0.07)
    with torch.no_grad():
        model.tau.fill_(5.0)
    model.eval()
    with torch.no_grad():
        out = model(**image_batch())
    assert out.tau.item() == pytest.approx(model.cfg.tau_max) and model.tau.item() == pytest.approx(0.5)


# ---- construction and config -------------------------------------------------------------------------
def test_wrong_widths_are_rejected():
    with pytest.raises(ValueError, match="projection dim"):
        LeccrModel(tiny_cfg(d=64), tiny_clip(), tiny_bert())
    with pytest.raises(ValueError, match="text_width"):
        LeccrModel(tiny_cfg(text_width=768), tiny_clip(), tiny_bert())
    with pytest.raises(ValueError, match="vision tower"):
        LeccrModel(tiny_cfg(), None, tiny_bert())


def test_config_defaults_and_presets():
    cfg = LeccrConfig()
    assert (cfg.n_slots, cfg.n_slot_layers, cfg.n_heads, cfg.d, cfg.embed_dim, cfg.image_size) == (4, 3, 8, 512, 256, 384)
    assert (cfg.slot_init, cfg.kl_temperature, cfg.kl_orientation, cfg.fusion_weight) == ("random", None, "consistent", 0.0)
    assert (cfg.desc_max_tokens, cfg.caption_max_words, cfg.alpha, cfg.tau_init) == (200, 30, 0.8, 0.07)
    de = LeccrConfig.from_preset("multi30k-de")
    assert (de.w_reg, de.w_cap, de.w_dstl, de.w_cv) == (0.05, 0.01, 0.0, 0.01)
    vtt = LeccrConfig.from_preset("msrvtt-cn", w_cap=0.02)
    assert (vtt.media, vtt.n_slots, vtt.n_slot_layers, vtt.w_reg, vtt.w_dstl, vtt.w_cap) == ("video", 2, 2, 0.03, 0.3, 0.02)
    assert set(BENCHMARK_PRESETS) == {"multi30k-de", "multi30k-fr", "multi30k-cs", "coco-ja", "coco-zh", "msrvtt-cn",
                                      "vatex-zh"}
    assert LeccrConfig.from_dict(vtt.to_dict()) == vtt
    # the release presets: the same weights, every release setting, and the train side
    model, train = resolve_preset("release-multi30k-fr")
    rel = LeccrConfig(**model)
    assert (rel.w_dstl, rel.cv_norm, rel.slot_init, rel.kl_orientation, rel.gather_grad) == (
        0.5, "release", "zeros", "release", "local")
    assert train == {"epochs": 70, "proj_lr_mult": 1.0, "grad_clip": 0.0, "precision": "fp32"}
    assert resolve_preset("multi30k-fr")[1] == {"epochs": 70} and resolve_preset("multi30k-de")[1] == {"epochs": 50}
    video = LeccrConfig(**{**resolve_preset("release-vatex-zh")[0], "d": 4096})
    assert (video.video_input, video.n_frame_layers, video.cv_batch, video.n_slots, video.fusion_weight) == (
        "features", 1, "rank", 2, 0.1)
    assert LeccrConfig.from_dict(rel.to_dict()) == rel
    # ablations are validated, normalised and round-trip
    ab = LeccrConfig(ablate=["local", "softened", "local"])
    assert ab.ablate == ("local", "softened") and ab.w_dstl == 0.0 and ab.fusion_weight == 0.0
    assert LeccrConfig.from_dict(ab.to_dict()) == ab
    with pytest.raises(ValueError, match="unknown ablation"):
        LeccrConfig(ablate=("everything",))
    with pytest.raises(ValueError, match="ablate descriptions"):
        LeccrConfig(n_slot_layers=0)
    with pytest.raises(ValueError):
        LeccrConfig(kl_orientation="transposed")
    with pytest.raises(ValueError):
        LeccrConfig(d=100)
    with pytest.raises(KeyError):
        LeccrConfig.from_preset("vatex-xx")
