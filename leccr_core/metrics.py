"""Retrieval metrics from a [captions x items] score matrix, and score fusion.

Ranks are 1-based. Ties are counted against the model (pessimistic): the rank of a ground
truth is 1 + the number of *non-ground-truth* candidates scoring at least as high as the best
ground truth. So a constant score matrix gets the worst ranks, not R@1 = 100, and the result
never depends on an argsort's tie order. Recalls are percentages (0-100), as papers report.
"""

from __future__ import annotations

import numpy as np
import torch

from .losses import local_similarity, minmax


def retrieval_ranks(scores, caption_item, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [C, I] (caption c vs item i); caption_item [C] int index of c's item in 0..I-1.

    Returns (t2v [C]: rank of each caption's item among all items,
             v2t [I']: per item with at least one caption, the best rank among its captions;
             items without any caption are left out of visual->text).
    """
    s = torch.as_tensor(scores)
    c2i = torch.as_tensor(np.asarray(caption_item), dtype=torch.long, device=s.device)
    C, I = s.shape
    if c2i.shape != (C,) or (c2i.numel() and (c2i.min() < 0 or c2i.max() >= I)):
        raise ValueError(f"caption_item must be [{C}] indices into {I} items")
    if torch.isnan(s).any():
        raise ValueError("score matrix contains NaN")

    # text -> visual: count items scoring >= the ground truth (the ground truth counts itself)
    gt = s[torch.arange(C, device=s.device), c2i]                           # [C]
    t2v = torch.cat([(s[a:a + chunk] >= gt[a:a + chunk, None]).sum(1) for a in range(0, C, chunk)])

    # visual -> text: per item, best ground-truth score, then non-gt captions scoring >= it
    st = s.t()                                                             # [I, C]
    v2t = []
    for a in range(0, I, chunk):
        block = st[a:a + chunk]                                            # [b, C]
        is_gt = c2i[None, :] == torch.arange(a, a + block.shape[0], device=s.device)[:, None]
        best = block.masked_fill(~is_gt, float("-inf")).amax(1)            # [b]
        v2t.append(1 + ((block >= best[:, None]) & ~is_gt).sum(1))
    v2t = torch.cat(v2t)
    has_caption = torch.bincount(c2i, minlength=I) > 0
    return t2v, v2t[has_caption]


def _summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double()
    out = {f"{prefix}_r{k}": 100.0 * (r <= k).double().mean().item() for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.median(r.cpu().numpy()))
    out[f"{prefix}_meanr"] = r.mean().item()
    return out


def retrieval_metrics(scores, caption_item) -> dict[str, float]:
    """R@1/5/10 and median/mean rank for text->visual (t2v) and visual->text (v2t), and
    rsum = the sum of the six recalls."""
    t2v, v2t = retrieval_ranks(scores, caption_item)
    out = {**_summary(t2v, "t2v"), **_summary(v2t, "v2t")}
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("t2v", "v2t") for k in (1, 5, 10))
    return out


def fuse_scores(s_global: torch.Tensor, s_local: torch.Tensor | None, weight: float) -> torch.Tensor:
    """(1 - w) mm(S_g) + w mm(S_l), mm = min-max over the whole matrix. w = 0: global only
    (mm is monotone, so the ranking is S_g's and S_l may be None)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight {weight} not in [0, 1]")
    if weight == 0.0:
        return minmax(s_global)
    return (1.0 - weight) * minmax(s_global) + weight * minmax(s_local)


def global_scores(h: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """S_g [C, I] = h_t v^T from L2-normalised caption [C, e] and item [I, e] embeddings."""
    return h @ v_hat.t()


def local_scores(h: torch.Tensor, m_hat: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """S_l [C, I] = max_k h_c . m^_{i,k}; chunked over captions so C x I x K never materialises."""
    return torch.cat([local_similarity(h[a:a + chunk], m_hat) for a in range(0, h.shape[0], chunk)])
