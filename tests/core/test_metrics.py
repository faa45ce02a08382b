"""Retrieval metrics against a brute-force reference; score fusion."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from leccr_core.losses import minmax
from leccr_core.metrics import fuse_scores, global_scores, local_scores, retrieval_metrics, retrieval_ranks


def brute_force(scores, c2i):
    """Sort candidates by score, ground truths *after* equal-scored others (pessimistic ties),
    and take the 1-based position of the first ground truth."""
    C, I = len(scores), len(scores[0])

    def first_gt(cands):   # cands: list of (score, is_gt)
        order = sorted(cands, key=lambda x: (-x[0], x[1]))
        return 1 + next(p for p, (_, gt) in enumerate(order) if gt)

    t2v = [first_gt([(scores[c][i], i == c2i[c]) for i in range(I)]) for c in range(C)]
    v2t = [first_gt([(scores[c][i], c2i[c] == i) for c in range(C)]) for i in range(I) if i in c2i]
    out = {}
    for name, r in (("t2v", t2v), ("v2t", v2t)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(x <= k for x in r) / len(r)
        out[f"{name}_medr"] = float(statistics.median(r))
        out[f"{name}_meanr"] = sum(r) / len(r)
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("t2v", "v2t") for k in (1, 5, 10))
    return t2v, v2t, out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("quantised", [False, True])
def test_matches_brute_force_with_several_captions_and_ties(seed, quantised):
    rng = np.random.default_rng(seed)
    n_items = 14
    c2i = np.concatenate([np.repeat(np.arange(12), rng.integers(1, 5, 12))])  # items 12, 13: no caption
    rng.shuffle(c2i)
    scores = rng.normal(size=(len(c2i), n_items)).astype(np.float32)
    scores[np.arange(len(c2i)), c2i] += 1.0                                     # some signal
    if quantised:
        scores = np.round(scores, 0)                                            # many ties
    t2v_ref, v2t_ref, ref = brute_force(scores.tolist(), c2i.tolist())
    t2v, v2t = retrieval_ranks(torch.from_numpy(scores), c2i, chunk=5)          # chunking exercised
    assert t2v.tolist() == t2v_ref and v2t.tolist() == v2t_ref
    got = retrieval_metrics(scores, c2i)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k]), k


def test_perfect_and_constant_scores():
    c2i = np.array([0, 0, 1, 2, 2, 2])
    perfect = np.full((6, 3), -1.0)
    perfect[np.arange(6), c2i] = 1.0
    m = retrieval_metrics(perfect, c2i)
    assert m["rsum"] == 600.0 and m["t2v_medr"] == 1.0 and m["v2t_medr"] == 1.0
    flat = retrieval_metrics(np.zeros((6, 3)), c2i)       # ties count against: no free R@1
    assert flat["t2v_r1"] == 0.0 and flat["t2v_medr"] == 3.0
    assert flat["v2t_r1"] == 0.0


def test_v2t_takes_the_best_ground_truth_caption():
    # item 0 has captions 0 and 1: caption 1 ranks first for it (caption 0 would rank last);
    # item 1's only caption 2 is beaten by caption 0
    s = torch.tensor([[0.1, 0.4], [0.9, 0.0], [0.5, 0.3]])
    _, v2t = retrieval_ranks(s, [0, 0, 1])
    assert v2t.tolist() == [1, 2]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        retrieval_ranks(torch.zeros(3, 2), [0, 1])
    with pytest.raises(ValueError):
        retrieval_ranks(torch.zeros(2, 2), [0, 2])
    with pytest.raises(ValueError):
        retrieval_ranks(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]]), [0, 1])


def test_fuse_scores():
    g = torch.Generator().manual_seed(0)
    sg, sl = torch.randn(5, 4, generator=g), 3 * torch.randn(5, 4, generator=g) + 2
    f0 = fuse_scores(sg, None, 0.0)
    assert torch.equal(f0.argsort(1), sg.argsort(1)) and torch.allclose(f0, minmax(sg))
    f = fuse_scores(sg, sl, 0.1)
    mm = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
    assert torch.allclose(f, 0.9 * mm(sg) + 0.1 * mm(sl), atol=1e-6)
    assert f.min() >= 0 and f.max() <= 1
    with pytest.raises(ValueError):
        fuse_scores(sg, sl, 1.5)


def test_score_matrices():
    g = torch.Generator().manual_seed(1)
    h, v, m = torch.randn(7, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    assert torch.allclose(global_scores(h, v), h @ v.t())
    ref = torch.tensor([[max(float(h[c] @ m[i, k]) for k in range(2)) for i in range(4)] for c in range(7)])
    assert torch.allclose(local_scores(h, m, chunk=3), ref, atol=1e-6)
