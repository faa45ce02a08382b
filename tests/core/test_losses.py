"""Each loss against explicit loops / hand-computed values on small tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from leccr_core.config import LeccrConfig
from leccr_core.losses import (itc_loss, local_loss, local_similarity, minmax, slot_diversity_loss,
                               slot_vision_loss, softened_matching_loss, total_loss)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def ref_soft_ce(logits, ids):
    """Loop form: row i's target spreads 1 evenly over the columns sharing i's id."""
    n, m = len(logits), len(logits[0])
    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(logits[i][j]) for j in range(m)))
        pos = [j for j in range(m) if ids[j] == ids[i]]
        total += -sum((logits[i][j] - lse) / len(pos) for j in pos)
    return total / n


def ref_itc(a, b, ids, tau):
    n = a.shape[0]
    l_ab = [[float(a[i] @ b[j]) / tau for j in range(n)] for i in range(n)]
    l_ba = [[float(b[i] @ a[j]) / tau for j in range(n)] for i in range(n)]
    return 0.5 * (ref_soft_ce(l_ab, ids) + ref_soft_ce(l_ba, ids))


# ---- ITC ------------------------------------------------------------------------------------
def test_itc_2x2_by_hand():
    e = torch.eye(2)
    # logits = I: each row CE = -log(e / (e + 1)) = log(1 + e^-1), both directions alike
    assert itc_loss(e, e, torch.tensor([0, 1]), 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_itc_two_captions_of_one_item_are_both_positives():
    e = torch.eye(2)
    # same id: target row [0.5, 0.5]; row logits [1, 0]: -(0.5 (1 - lse) + 0.5 (0 - lse)) = lse - 0.5
    expected = math.log(math.e + 1) - 0.5
    assert itc_loss(e, e, torch.tensor([7, 7]), 1.0).item() == pytest.approx(expected, abs=1e-6)
    # hard targets would give a different value: the soft targets are really used
    assert itc_loss(e, e, torch.tensor([0, 1]), 1.0).item() != pytest.approx(expected, abs=1e-3)


def test_itc_matches_loops_with_repeated_ids():
    a, b = unit(5, 8, seed=1), unit(5, 8, seed=2)
    ids = torch.tensor([3, 1, 3, 0, 1])
    assert itc_loss(a, b, ids, 0.07).item() == pytest.approx(ref_itc(a, b, ids.tolist(), 0.07), rel=1e-5)


def test_itc_none_ids_is_hard_diagonal():
    a, b = unit(4, 8, seed=3), unit(4, 8, seed=4)
    assert itc_loss(a, b, None, 0.1).item() == pytest.approx(itc_loss(a, b, torch.arange(4), 0.1).item(), abs=1e-7)


# ---- local ----------------------------------------------------------------------------------
def test_local_loss_matches_loops():
    n, K, e, tau = 3, 4, 6, 0.2
    m = torch.randn(n, K, e, generator=torch.Generator().manual_seed(5))
    h = unit(n, e, seed=6)
    l = [[max(float(m[i, k] @ h[j]) for k in range(K)) / tau for j in range(n)] for i in range(n)]
    lt = [[l[j][i] for j in range(n)] for i in range(n)]
    expected = 0.5 * (ref_soft_ce(l, list(range(n))) + ref_soft_ce(lt, list(range(n))))
    assert local_loss(m, h, tau).item() == pytest.approx(expected, rel=1e-5)


def test_local_similarity_orientation():
    m = torch.zeros(2, 2, 2)
    m[0, 1] = torch.tensor([1.0, 0.0])        # item 0 has a slot along x
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # caption 0 along x
    s = local_similarity(h, m)                  # [caption, item]
    assert s[0, 0] == 1 and s[0, 1] == 0 and s[1, 0] == 0


# ---- slot-vision --------------------------------------------------------------------------------
def test_slot_vision_loss_matches_loops_with_mask():
    n, K, N, d = 3, 2, 4, 5
    g = torch.Generator().manual_seed(7)
    slots, toks = torch.randn(n, K, d, generator=g), torch.randn(n, N, d, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    ids = [0, 1, 0]
    sim = []
    for i in range(n):
        row = []
        for j in range(n):
            cos = [float(F.cosine_similarity(slots[i, k], toks[j, t], dim=0))
                   for k in range(K) for t in range(N) if mask[j, t]]
            row.append(sum(cos) / len(cos))
        sim.append(row)
    expected = ref_soft_ce(sim, ids)  # slots -> visuals only, no temperature
    got = slot_vision_loss(slots, toks, torch.tensor(ids), mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # padded tokens are ignored: changing them changes nothing
    toks2 = toks.clone()
    toks2[mask == 0] = 100.0
    assert slot_vision_loss(slots, toks2, torch.tensor(ids), mask).item() == pytest.approx(got.item(), abs=1e-6)


def test_slot_vision_loss_applies_projections():
    g = torch.Generator().manual_seed(8)
    slots, toks = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    ps, pt = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ids = torch.tensor([0, 1])
    inside = slot_vision_loss(slots, toks, ids, slot_proj=ps, token_proj=pt)
    before = slot_vision_loss(ps(slots), pt(toks), ids)
    assert inside.item() == pytest.approx(before.item(), abs=1e-6)
    assert inside.item() != pytest.approx(slot_vision_loss(slots, toks, ids).item(), abs=1e-4)


# ---- slot diversity ---------------------------------------------------------------------------
def test_slot_diversity_orthogonal_is_zero_identical_is_known():
    ortho = torch.eye(4).unsqueeze(0).repeat(2, 1, 1) * 3.0       # 4 orthogonal slots, any norm
    assert slot_diversity_loss(ortho).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.randn(3, 1, 8).repeat(1, 4, 1)                    # K = 4 identical slots
    assert slot_diversity_loss(same).item() == pytest.approx(1 - 1 / 4, abs=1e-6)


def test_slot_diversity_matches_loops():
    s = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(9))
    tot = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                tot += float(F.cosine_similarity(s[b, i], s[b, j], dim=0)) - (i == j)
    assert slot_diversity_loss(s).item() == pytest.approx(tot / (2 * 9), abs=1e-6)


# ---- softened matching (KL) ---------------------------------------------------------------------
def ref_kl(h_s, h_t, v, m, alpha, temperature=None, orientation="consistent"):
    n = h_s.shape[0]
    t = 1.0 if temperature is None else temperature
    sg = [[float(h_s[c] @ v[i]) for i in range(n)] for c in range(n)]
    if orientation == "consistent":
        sl = [[max(float(h_s[c] @ m[i, k]) for k in range(m.shape[1])) for i in range(n)] for c in range(n)]
    else:  # [item, caption] used as if it were [caption, item]
        sl = [[max(float(m[r, k] @ h_s[c]) for k in range(m.shape[1])) for c in range(n)] for r in range(n)]

    def mm(x):
        lo, hi = min(map(min, x)), max(map(max, x))
        return [[(y - lo) / (hi - lo) for y in row] for row in x]

    sg, sl = mm(sg), mm(sl)
    total = 0.0
    for c in range(n):
        tl = [(alpha * sg[c][i] + (1 - alpha) * sl[c][i]) / t for i in range(n)]
        pl = [float(h_t[c] @ v[i]) / t for i in range(n)]
        tz, pz = math.log(sum(map(math.exp, tl))), math.log(sum(map(math.exp, pl)))
        for i in range(n):
            p = math.exp(tl[i] - tz)
            total += p * ((tl[i] - tz) - (pl[i] - pz))
    return total / n


def test_kl_zero_when_target_equals_prediction():
    # orthonormal h_s = v: h_s v^T = I, already in [0, 1], so mm is the identity and with
    # alpha = 1 and h_t = h_s the target equals the prediction
    e = torch.eye(3)
    m = torch.randn(3, 2, 3)
    assert softened_matching_loss(e, e, e, m, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)
    # alpha < 1 mixes in the slots: no longer zero
    assert softened_matching_loss(e, e, e, m, alpha=0.5).item() > 1e-4


@pytest.mark.parametrize("orientation", ["consistent", "release"])
@pytest.mark.parametrize("temperature", [None, 0.1])
def test_kl_matches_loops(orientation, temperature):
    h_s, h_t, v = unit(4, 6, seed=10), unit(4, 6, seed=11), unit(4, 6, seed=12)
    m = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(13))
    got = softened_matching_loss(h_s, h_t, v, m, 0.8, temperature, orientation)
    assert got.item() == pytest.approx(ref_kl(h_s, h_t, v, m, 0.8, temperature, orientation), rel=1e-5)


def test_kl_release_orientation_differs_on_non_symmetric_example():
    h_s, h_t, v = unit(4, 6, seed=14), unit(4, 6, seed=15), unit(4, 6, seed=16)
    m = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(17))
    a = softened_matching_loss(h_s, h_t, v, m, 0.5, orientation="consistent")
    b = softened_matching_loss(h_s, h_t, v, m, 0.5, orientation="release")
    assert abs(a.item() - b.item()) > 1e-4
    with pytest.raises(ValueError):
        softened_matching_loss(h_s, h_t, v, m, orientation="sideways")


def test_kl_target_is_detached():
    h_s, h_t, v = unit(3, 4, seed=18), unit(3, 4, seed=19), unit(3, 4, seed=20)
    m = torch.randn(3, 2, 4)
    for x in (h_s, h_t, v, m):
        x.requires_grad_(True)
    softened_matching_loss(h_s, h_t, v, m).backward()
    assert h_s.grad is None and m.grad is None           # only the target uses them
    assert h_t.grad is not None and h_t.grad.abs().sum() > 0 and v.grad is not None


def test_minmax_whole_matrix():
    x = torch.tensor([[1.0, 3.0], [5.0, 9.0]])
    assert torch.allclose(minmax(x), torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.isfinite(minmax(torch.ones(2, 2))).all()


# ---- total -------------------------------------------------------------------------------------
def fake_output(n=4, K=2, e=6, d=5, N=3, seed=21, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    return SimpleNamespace(
        v_hat=F.normalize(t(n, e), dim=-1), h_s=F.normalize(t(n, e), dim=-1), h_t=F.normalize(t(n, e), dim=-1),
        m_hat=t(n, K, e), slots=t(n, K, d), cv_slots=t(n, K, d), cv_tokens=t(n, N, d), visual_mask=None,
        tau=torch.tensor(0.07))


def test_total_loss_is_the_formula():
    out, ids = fake_output(), torch.tensor([0, 1, 0, 2])
    cfg = LeccrConfig(w_reg=0.05, w_cap=0.02, w_dstl=0.3, w_cv=0.04, alpha=0.8)
    loss, parts = total_loss(out, ids, cfg)
    tau = 0.07
    expected = (itc_loss(out.v_hat, out.h_s, ids, tau) + 0.7 * itc_loss(out.v_hat, out.h_t, ids, tau)
                + 0.3 * softened_matching_loss(out.h_s, out.h_t, out.v_hat, out.m_hat, 0.8)
                + itc_loss(out.h_s, out.h_t, ids, tau)
                + 0.02 * (local_loss(out.m_hat, out.h_s, tau) + local_loss(out.m_hat, out.h_t, tau))
                + 0.04 * slot_vision_loss(out.cv_slots, out.cv_tokens, ids)
                + 0.05 * slot_diversity_loss(out.slots))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"itc_vs", "itc_vt", "kl", "itc_st", "loc_s", "loc_t", "cv", "reg", "loss", "tau"}
    assert parts["cv"].item() == pytest.approx(slot_vision_loss(out.cv_slots, out.cv_tokens, ids).item(), rel=1e-6)
    # w_dstl = 0 drops the KL term entirely and keeps the full ITC(v, h_t)
    loss0, parts0 = total_loss(out, ids, LeccrConfig(w_reg=0.05, w_cap=0.02, w_dstl=0.0, w_cv=0.04))
    assert (loss0 - loss).item() == pytest.approx((0.3 * parts["itc_vt"] - 0.3 * parts["kl"]).item(), rel=1e-5)


def test_total_loss_backward_reaches_every_input():
    out = fake_output(grad=True)
    leaves = [out.v_hat, out.h_s, out.h_t, out.m_hat, out.slots, out.cv_slots, out.cv_tokens]
    for x in leaves:
        x.retain_grad()
    loss, _ = total_loss(out, torch.arange(4), LeccrConfig())
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves)
