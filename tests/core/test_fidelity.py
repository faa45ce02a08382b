"""Tests that catch a broken loss: per term, the gradient reaches exactly the parameters the
method says (non-zero there, nothing elsewhere) and vanishes with its weight; every ablation
removes its parameters and terms and leaves no parameter without a gradient (what DDP needs);
the release preset's L_cv and KL against an independent re-implementation of the release's
code on a fixed batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from leccr_core.config import ABLATIONS, LeccrConfig, resolve_preset
from leccr_core.losses import total_loss

from .test_model import image_batch
from .tiny import D, tiny_model, tokens

# Parameter groups of LeccrModel, by name prefix.
GROUPS = ("vision", "text", "text_proj", "visual_proj", "tau", "slot_queries", "desc_proj", "slot_layers",
          "enhance_layers", "local_layers", "local_proj", "cv_slot_proj", "cv_token_proj", "frame_layers")
SLOT_GEN = {"slot_queries", "desc_proj", "slot_layers"}             # M = slots from descriptions
GLOBAL_VISUAL = {"vision", "visual_proj", "enhance_layers"} | SLOT_GEN  # v^ = proj(CLS of CA(Z_v, M))
CAPTION = {"text", "text_proj"}                                     # h = normalize(proj(BERT [CLS]))
# What the method says each term's gradient reaches. Descriptions are encoded under no-grad,
# so the text encoder is reached only through captions; the KL has no temperature and a
# detached target, so neither tau nor the local branch; L_cv sees M and raw Z_v only.
REACH = {
    "itc_vs": GLOBAL_VISUAL | CAPTION | {"tau"},
    "itc_vt": GLOBAL_VISUAL | CAPTION | {"tau"},
    "itc_st": CAPTION | {"tau"},
    "kl": GLOBAL_VISUAL | CAPTION,
    "loc_s": {"vision", "local_layers", "local_proj", "tau"} | SLOT_GEN | CAPTION,
    "loc_t": {"vision", "local_layers", "local_proj", "tau"} | SLOT_GEN | CAPTION,
    "cv": {"vision", "cv_slot_proj", "cv_token_proj"} | SLOT_GEN,
    "reg": set(SLOT_GEN),
}
WEIGHTS = dict(w_dstl=0.4, w_cap=0.3, w_cv=0.2, w_reg=0.1)


def coef(part: str, cfg: LeccrConfig) -> float:
    """The weight of each part in L (the method page's formula)."""
    return {"itc_vs": 1.0, "itc_vt": 1 - cfg.w_dstl, "kl": cfg.w_dstl, "itc_st": 1.0, "loc_s": cfg.w_cap,
            "loc_t": cfg.w_cap, "cv": cfg.w_cv, "reg": cfg.w_reg}[part]


def group_of(name: str) -> str:
    return next(g for g in sorted(GROUPS, key=len, reverse=True) if name == g or name.startswith(g + "."))


def grads(loss, params) -> list[torch.Tensor]:
    out = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for (_, p), g in zip(params, out)]


def reached(gs, params) -> set[str]:
    return {group_of(n) for (n, _), g in zip(params, gs) if g.abs().max() > 0}


@pytest.fixture(scope="module")
def image_setup():
    model = tiny_model(dropout=0.0, **WEIGHTS)
    params = list(model.named_parameters())
    b = image_batch(B=3)
    ids = torch.tensor([0, 1, 2])
    out = model(**b)
    return model, params, out, ids


def video_features_setup():
    model = tiny_model(dropout=0.0, media="video", video_input="features", n_slots=2, **WEIGHTS)
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 4, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    d_ids, d_mask = tokens(3, 10, 6, [10, 4, 7])
    s_ids, s_mask = tokens(3, 6, 7)
    t_ids, t_mask = tokens(3, 6, 8)
    out = model(feats, d_ids, d_mask, s_ids, s_mask, t_ids, t_mask, visual_mask=mask)
    return model, list(model.named_parameters()), out, torch.tensor([0, 1, 0])


# ---- gradient flow, per term -------------------------------------------------------------------
@pytest.mark.parametrize("part", sorted(REACH))
def test_each_term_reaches_exactly_its_parameters(image_setup, part):
    model, params, out, ids = image_setup
    _, parts = total_loss(out, ids, model.cfg)
    live = _live_parts(out, ids, model.cfg)        # with their graphs (total_loss's parts are detached)
    assert live[part].item() == pytest.approx(parts[part].item(), rel=1e-6)
    got = reached(grads(live[part], params), params)
    assert got == REACH[part], f"{part}: reaches {sorted(got)}, expected {sorted(REACH[part])}"


def _live_parts(out, ids, cfg):
    """Each part with its graph: L's gradient is the parts' gradients weighted by coef()."""
    from leccr_core import losses as L
    return {
        "itc_vs": L.itc_loss(out.v_hat, out.h_s, ids, out.tau), "itc_vt": L.itc_loss(out.v_hat, out.h_t, ids, out.tau),
        "itc_st": L.itc_loss(out.h_s, out.h_t, ids, out.tau),
        "kl": L.softened_matching_loss(out.h_s, out.h_t, out.v_hat, out.m_hat, cfg.alpha, cfg.kl_temperature,
                                       cfg.kl_orientation),
        "loc_s": L.local_loss(out.m_hat, out.h_s, out.tau), "loc_t": L.local_loss(out.m_hat, out.h_t, out.tau),
        "cv": L.slot_vision_loss(out.cv_slots, out.cv_tokens, ids, out.visual_mask, norm=cfg.cv_norm),
        "reg": L.slot_diversity_loss(out.slots),
    }


@pytest.mark.parametrize("weight", ["w_dstl", "w_cap", "w_cv", "w_reg"])
def test_a_terms_gradient_scales_with_its_weight_and_vanishes_at_zero(image_setup, weight):
    model, params, out, ids = image_setup
    live = _live_parts(out, ids, model.cfg)
    part_grads = {k: grads(v, params) for k, v in live.items()}
    for w in (WEIGHTS[weight], 0.0):
        cfg = LeccrConfig(**{**model.cfg.to_dict(), weight: w})
        loss, _ = total_loss(out, ids, cfg)
        total = grads(loss, params)
        expected = [sum(coef(k, cfg) * part_grads[k][i] for k in live) for i in range(len(params))]
        for (name, _), a, e in zip(params, total, expected):
            assert torch.allclose(a, e, atol=1e-6, rtol=1e-4), (weight, w, name)
        # parameters only this term reaches get exactly nothing at weight 0, something above it
        own = {"w_cap": {"local_layers", "local_proj"}, "w_cv": {"cv_slot_proj", "cv_token_proj"}}.get(weight, set())
        for (name, _), g in zip(params, total):
            if group_of(name) in own:
                assert (g.abs().max() > 0) == (w > 0), (weight, w, name)


def test_kl_gradient_is_tiny_without_temperature_and_grows_with_one(image_setup):
    """The release's KL (no temperature: a very flat target) moves the model ~orders of
    magnitude less than the ITC term it replaces; a temperature restores it (ours)."""
    model, params, out, ids = image_setup
    norm = lambda loss: torch.sqrt(sum((g ** 2).sum() for g in grads(loss, params)))  # noqa: E731
    flat = _live_parts(out, ids, model.cfg)
    sharp = _live_parts(out, ids, LeccrConfig(**{**model.cfg.to_dict(), "kl_temperature": 0.07}))
    assert norm(flat["kl"]) < 0.1 * norm(flat["itc_vt"])
    assert norm(sharp["kl"]) > 10 * norm(flat["kl"])


def test_video_features_terms_reach_frame_layers_not_the_text_side():
    model, params, out, ids = video_features_setup()
    live = _live_parts(out, ids, model.cfg)
    video_reach = lambda s: {"frame_layers" if g == "vision" else g for g in s}  # noqa: E731
    for part in ("cv", "reg", "itc_st", "loc_t"):
        assert reached(grads(live[part], params), params) == video_reach(REACH[part]), part
    assert "text_proj" not in reached(grads(live["cv"], params), params)


# ---- ablations: parameters and terms ----------------------------------------------------------
REMOVED = {
    "slots": {"slot_queries", "desc_proj", "slot_layers", "enhance_layers", "local_layers", "local_proj",
              "cv_slot_proj", "cv_token_proj"},
    "descriptions": {"desc_proj", "slot_layers"},
    "softened": set(),
    "local": {"local_layers", "local_proj"},
    "cv": {"cv_slot_proj", "cv_token_proj"},
    "reg": set(),
}
TERMS_GONE = {"slots": {"loc_s", "loc_t", "cv", "reg"}, "descriptions": set(), "softened": {"kl"},
              "local": {"loc_s", "loc_t"}, "cv": {"cv"}, "reg": {"reg"}}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_removes_its_parameters_and_terms_and_leaves_every_parameter_a_gradient(name):
    full = tiny_model(dropout=0.0, **WEIGHTS)
    model = tiny_model(dropout=0.0, ablate=(name,), **WEIGHTS)
    groups = lambda m: {group_of(n) for n, _ in m.named_parameters()}  # noqa: E731
    assert groups(full) - groups(model) == REMOVED[name]
    b = image_batch(B=3)
    if not model.cfg.uses_descriptions:                  # no description input at all
        b = {k: v for k, v in b.items() if not k.startswith("desc")}
    out = model(**b)
    loss, parts = total_loss(out, torch.tensor([0, 1, 2]), model.cfg)
    _, full_parts = total_loss(full(**image_batch(B=3)), torch.tensor([0, 1, 2]), full.cfg)
    assert set(full_parts) - set(parts) == TERMS_GONE[name]
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"--ablate {name} leaves parameters without a gradient (DDP would fail): {unused}"
    if name == "softened":
        assert model.cfg.w_dstl == 0.0
    if name in ("slots", "local"):
        assert model.cfg.fusion_weight == 0.0 and out.m_hat is None


def test_full_model_with_zero_weights_still_gives_every_parameter_a_gradient():
    """A weight of 0 (e.g. multi30k-de's w_dstl) keeps the term: its parameters get zero, not
    None, so DDP needs no find_unused_parameters."""
    model = tiny_model(dropout=0.0, w_dstl=0.0, w_cap=0.0, w_cv=0.0, w_reg=0.0)
    loss, parts = total_loss(model(**image_batch(B=3)), torch.tensor([0, 1, 2]), model.cfg)
    assert {"kl", "loc_s", "cv", "reg"} <= set(parts)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---- the release preset against the release's own formulas ----------------------------------------
def release_cv(slots, tokens_, ids):
    """The release's caption_vision_loss, re-done with loops: F.normalize's default dim=1 on
    [B, K, d] and [B, N, d] (each feature normalised over the slots / tokens of its item),
    sim(i, j) = mean over (k, t) of slot_ik . token_jt, cross-entropy rows = slots, no
    temperature, soft multi-positive labels."""
    B, K, d = slots.shape
    N = tokens_.shape[1]

    def norm_axis1(x, i, n):
        return [[x[i][r][c] / max(math.sqrt(sum(x[i][q][c] ** 2 for q in range(n))), 1e-12) for c in range(d)]
                for r in range(n)]

    s = [norm_axis1(slots.tolist(), i, K) for i in range(B)]
    z = [norm_axis1(tokens_.tolist(), i, N) for i in range(B)]
    sim = [[sum(sum(a * b for a, b in zip(s[i][k], z[j][t])) for k in range(K) for t in range(N)) / (K * N)
            for j in range(B)] for i in range(B)]
    total = 0.0
    for i in range(B):
        lse = math.log(sum(math.exp(x) for x in sim[i]))
        pos = [j for j in range(B) if ids[j] == ids[i]]
        total += -sum(sim[i][j] - lse for j in pos) / len(pos)
    return total / B, sim


def release_kl(h_s, h_t, v, m_hat, alpha=0.8):
    """The release's dstl_loss, re-done with loops: logits_sc[i][j] = max_k m_ik . h_s_j (item
    i, caption j) added as is to logits_sv[c][i] = h_s_c . v_i; norm_score = (x - min) / max."""
    B, K = m_hat.shape[:2]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    hs, ht, vv, mm_ = h_s.tolist(), h_t.tolist(), v.tolist(), m_hat.tolist()
    sv = [[dot(hs[c], vv[i]) for i in range(B)] for c in range(B)]
    sc = [[max(dot(mm_[i][k], hs[j]) for k in range(K)) for j in range(B)] for i in range(B)]

    def norm_score(x):
        lo = min(map(min, x))
        shifted = [[y - lo for y in row] for row in x]
        hi = max(map(max, shifted))
        return [[y / hi for y in row] for row in shifted]

    sv, sc = norm_score(sv), norm_score(sc)
    total = 0.0
    for r in range(B):
        lab = [alpha * sv[r][i] + (1 - alpha) * sc[r][i] for i in range(B)]
        zl = math.log(sum(map(math.exp, lab)))
        tv = [dot(ht[r], vv[i]) for i in range(B)]
        zt = math.log(sum(map(math.exp, tv)))
        total += sum(math.exp(lab[i] - zl) * ((lab[i] - zl) - (tv[i] - zt)) for i in range(B))
    return total / B


def fixed_batch(n=5, K=3, N=4, d=6, e=5):
    g = torch.Generator().manual_seed(123)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return SimpleNamespace(v_hat=F.normalize(r(n, e), dim=-1), h_s=F.normalize(r(n, e), dim=-1),
                           h_t=F.normalize(r(n, e), dim=-1), m_hat=r(n, K, e), slots=r(n, K, d),
                           cv_slots=r(n, K, d), cv_tokens=r(n, N, d), visual_mask=None, tau=torch.tensor(0.07))


@pytest.mark.parametrize("preset", ["release-multi30k-fr", "release-coco-ja"])
def test_release_preset_reproduces_the_release_cv_and_kl(preset):
    cfg = LeccrConfig(**resolve_preset(preset)[0])
    out, ids = fixed_batch(), torch.tensor([0, 1, 2, 0, 3])
    _, parts = total_loss(out, ids, cfg)
    cv, sim = release_cv(out.cv_slots, out.cv_tokens, ids.tolist())
    assert parts["cv"].item() == pytest.approx(cv, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(release_kl(out.h_s, out.h_t, out.v_hat, out.m_hat, cfg.alpha),
                                               rel=1e-5)
    # the method page's (default) choices are really different objectives on the same batch
    _, ours = total_loss(out, ids, LeccrConfig(**resolve_preset(preset.removeprefix("release-"))[0]))
    assert abs(ours["cv"].item() - parts["cv"].item()) > 1e-3
    assert abs(ours["kl"].item() - parts["kl"].item()) > 1e-5
    # and the release's L_cv logits are the larger ones (normalised over 3-4 vectors, not 6 features)
    s_bar = F.normalize(out.cv_slots, dim=-1).mean(1)
    z_bar = F.normalize(out.cv_tokens, dim=-1).mean(1)
    assert max(abs(x) for row in sim for x in row) > (s_bar @ z_bar.t()).abs().max().item()


# ---- views --------------------------------------------------------------------------------------
def test_random_view_sampling_feeds_one_present_view_per_step_and_evaluation_all():
    from transformers import BertTokenizer

    from leccr_core.data import (DataConfig, ItemRecord, PairRecord, TrainDataset, _descriptions_row,
                                 collate_train)

    from .tiny import VOCAB
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    items = [ItemRecord("a", "video", "/", "x", ("a dog", None, "the red ball"), features="unused"),
             ItemRecord("b", "video", "/", "y", ("a cat", "a man", "grass"), features="unused")]
    pairs = [PairRecord(i % 2, "a dog", "ein hund") for i in range(40)]
    cfg = DataConfig(views=("v0", "v1", "v2"), view_sampling="random")
    ds = TrainDataset(items, pairs, tok, cfg, seed=3)
    chosen = [ds.views_for(0, i, items[p.item]) for i, p in enumerate(pairs)]
    assert all(len(c) == 1 for c in chosen)
    assert {c[0] for c, p in zip(chosen, pairs) if p.item == 0} == {0, 2}         # never the missing view
    assert {c[0] for c, p in zip(chosen, pairs) if p.item == 1} == {0, 1, 2}
    assert chosen == [ds.views_for(0, i, items[p.item]) for i, p in enumerate(pairs)]   # deterministic
    assert chosen != [ds.views_for(1, i, items[p.item]) for i, p in enumerate(pairs)]   # redrawn per epoch
    every = TrainDataset(items, pairs, tok, DataConfig(views=cfg.views), seed=3)
    assert every.views_for(0, 0, items[0]) == [0, 1, 2]
    rows = []
    for i in range(2):                                  # rows without media: the description part only
        row = {"visual": torch.zeros(2, D), "item": pairs[i].item, "src": [2, 3], "tgt": [2, 3]}
        _descriptions_row(row, pairs[i].item, items[pairs[i].item], ds.views_for(0, i, items[pairs[i].item]),
                          tok, cfg, None)
        rows.append(row)
    assert collate_train(rows)["desc_ids"].dim() == 2                   # one view: [B, L]
    ev_row = {"visual": torch.zeros(2, D)}
    _descriptions_row(ev_row, 1, items[1], range(3), tok, cfg, None)      # what ItemDataset feeds
    assert len(ev_row["desc"]) == 3                                       # evaluation: every view
