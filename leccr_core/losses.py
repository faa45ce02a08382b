"""LECCR losses as small pure functions over the model's named embeddings.

Conventions: rows of every [caption, item] matrix are captions, columns items (as the
retrieval score matrices in metrics.py). ``ids`` are integer item ids per batch row: rows that
share an id are all positives of each other ("soft multi-positive" targets). Only
``total_loss`` knows about ranks: it gathers, the other functions see whatever batch they get.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_with_grad


def positives(ids: torch.Tensor | None, n: int, device=None) -> torch.Tensor:
    """[n, n] float, 1 where rows i and j share an id (the diagonal always)."""
    if ids is None:
        return torch.eye(n, device=device)
    ids = ids.reshape(-1)
    return (ids[:, None] == ids[None, :]).float()


def soft_cross_entropy(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of row-softmax(logits) against pos with each row normalised to sum 1,
    averaged over rows. logits, pos: [n, m]."""
    target = pos / pos.sum(1, keepdim=True)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def itc_loss(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor | None, tau) -> torch.Tensor:
    """Symmetric InfoNCE with soft multi-positive targets. a, b: [n, e] (L2-normalised);
    ids: [n] or None (hard diagonal). Mean of the a->b and b->a cross-entropies."""
    logits = a @ b.t() / tau                                  # [n, n]
    pos = positives(ids, a.shape[0], a.device)                # symmetric: same ids both sides
    return 0.5 * (soft_cross_entropy(logits, pos) + soft_cross_entropy(logits.t(), pos.t()))


def local_similarity(h: torch.Tensor, slot_emb: torch.Tensor) -> torch.Tensor:
    """s_l[c, i] = max_k h_c . m^_{i,k}. h: [C, e]; slot_emb: [I, K, e] -> [C, I]."""
    return torch.einsum("ce,ike->cik", h, slot_emb).amax(dim=2)


def local_loss(slot_emb: torch.Tensor, h: torch.Tensor, tau) -> torch.Tensor:
    """L_loc: l[i, j] = max_k(m^_{i,k} . h_j) / tau, item i vs caption j, hard diagonal targets,
    mean of the row-wise and column-wise cross-entropies. slot_emb: [n, K, e]; h: [n, e]."""
    logits = local_similarity(h, slot_emb).t() / tau          # [items, captions]
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def slot_vision_summaries(slots: torch.Tensor, visual_tokens: torch.Tensor,
                          token_mask: torch.Tensor | None = None,
                          norm: str = "feature") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item means of normalised slots and (valid) visual tokens -> ([n, d], [n, d]).

    norm "feature": every slot / token vector is L2-normalised over its d features (the
    method's cosines); "release": over the slot / token axis (dim=1 of [n, K, d] / [n, N, d],
    F.normalize's default as the release calls it), per feature. Padded tokens are zeroed first
    and left out of the mean in both. The mean similarity over all (slot of i, token of j)
    pairs is bilinear, so it equals mean_slot(i) . mean_token(j): O(n^2 d) instead of
    O(n^2 K N d), and across ranks only these [n, d] summaries need gathering.
    """
    if norm not in ("feature", "release"):
        raise ValueError(f"norm={norm!r}; expected 'feature' or 'release'")
    dim = -1 if norm == "feature" else 1
    if token_mask is not None:
        m = token_mask.to(visual_tokens.dtype).unsqueeze(-1)  # [n, N, 1]
        visual_tokens = visual_tokens * m
    s = F.normalize(slots, dim=dim).mean(1)                   # [n, d]
    z = F.normalize(visual_tokens, dim=dim)                   # [n, N, d]
    if token_mask is None:
        return s, z.mean(1)
    return s, (z * m).sum(1) / m.sum(1).clamp_min(1.0)


def slot_vision_loss(slots: torch.Tensor, visual_tokens: torch.Tensor, ids: torch.Tensor | None,
                     token_mask: torch.Tensor | None = None, slot_proj=None, token_proj=None,
                     norm: str = "feature") -> torch.Tensor:
    """L_cv. slots: M before interaction [n, K, d]; visual_tokens: raw Z_v [n, N, d];
    token_mask: [n, N] (1 = valid frame) for video. slot_proj / token_proj: the model's two
    Linear(d -> d) layers, or None when they were applied already (LeccrOutput.cv_slots /
    cv_tokens are). sim(i, j) = mean similarity over all (slot, token) pairs (a mean cosine
    with norm "feature"); cross-entropy from slots to visuals only, no temperature, soft
    multi-positive targets."""
    if slot_proj is not None:
        slots = slot_proj(slots)
    if token_proj is not None:
        visual_tokens = token_proj(visual_tokens)
    s, z = slot_vision_summaries(slots, visual_tokens, token_mask, norm)
    return soft_cross_entropy(s @ z.t(), positives(ids, s.shape[0], s.device))


def slot_diversity_loss(slots: torch.Tensor) -> torch.Tensor:
    """L_reg: mean over the batch and over all K x K entries of C_b - I, C_b the cosine matrix
    of item b's slots. slots: [n, K, d]. 0 for orthogonal slots, 1 - 1/K for identical ones."""
    s = F.normalize(slots, dim=-1)
    c = s @ s.transpose(1, 2)                                  # [n, K, K]
    eye = torch.eye(c.shape[-1], device=c.device, dtype=c.dtype)
    return (c - eye).mean()


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalisation over the whole matrix (not per row)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(eps)


def softened_matching_loss(h_s: torch.Tensor, h_t: torch.Tensor, v: torch.Tensor, slot_emb: torch.Tensor | None,
                           alpha: float = 0.8, temperature: float | None = None,
                           orientation: str = "consistent") -> torch.Tensor:
    """KL(P || pred), batch-mean. Rows are captions, columns items; the batch is square (row b
    of h_s / h_t is a caption of item b). h_s, h_t: [n, e]; v: [n, e]; slot_emb: [n, K, e], or
    None when the local branch is ablated (then P = softmax_row(mm(h_s v^T)), alpha = 1).

    P = softmax_row(alpha mm(h_s v^T) + (1 - alpha) mm(S_l)), detached, with S_l[c, i] =
    max_k h_s_c . m^_{i,k} ("consistent"), or its transpose added as is ("release": the
    release computes the slot term [item, caption] and adds it without transposing).
    pred = log_softmax_row(h_t v^T). ``temperature`` (ours) divides both sides' logits.
    """
    if orientation not in ("consistent", "release"):
        raise ValueError(f"orientation={orientation!r}; expected 'consistent' or 'release'")
    t = 1.0 if temperature is None else temperature
    with torch.no_grad():
        s_g = h_s @ v.t()                                      # [caption, item]
        if slot_emb is None:
            mixed = minmax(s_g)
        else:
            s_l = local_similarity(h_s, slot_emb)              # [caption, item]
            if orientation == "release":
                s_l = s_l.t()                                  # [item, caption], kept untransposed
            mixed = alpha * minmax(s_g) + (1 - alpha) * minmax(s_l)
        target = F.softmax(mixed / t, dim=1)
    pred = F.log_softmax(h_t @ v.t() / t, dim=1)
    return F.kl_div(pred, target, reduction="batchmean")


def total_loss(out, ids: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = ITC(v, h_s) + (1 - w_dstl) ITC(v, h_t) + w_dstl KL + ITC(h_s, h_t)
           + w_cap (L_loc(h_s) + L_loc(h_t)) + w_cv L_cv + w_reg L_reg.

    out: a LeccrOutput (needs v_hat, m_hat, h_s, h_t, slots, cv_slots, cv_tokens, visual_mask,
    tau). ids: [n] int item ids. ITC, KL and L_cv use the batch gathered over all ranks (L_cv:
    this rank's with cfg.cv_batch = "rank"); L_loc and L_reg use this rank's batch. A term that
    cfg.ablate removes is neither computed nor in the parts (a weight of 0 still computes it,
    so a DDP run keeps a gradient, zero, on every parameter). Returns the loss and detached
    parts for logging.
    """
    g = lambda x: gather_with_grad(x, cfg.gather_grad)  # noqa: E731
    tau = out.tau
    v, h_s, h_t, all_ids = g(out.v_hat), g(out.h_s), g(out.h_t), g(ids)
    m_hat = g(out.m_hat) if cfg.has_local else None

    parts = {
        "itc_vs": itc_loss(v, h_s, all_ids, tau),
        "itc_vt": itc_loss(v, h_t, all_ids, tau),
        "itc_st": itc_loss(h_s, h_t, all_ids, tau),
    }
    loss = parts["itc_vs"] + (1 - cfg.w_dstl) * parts["itc_vt"] + parts["itc_st"]
    if cfg.has_kl:
        parts["kl"] = softened_matching_loss(h_s, h_t, v, m_hat, cfg.alpha, cfg.kl_temperature, cfg.kl_orientation)
        loss = loss + cfg.w_dstl * parts["kl"]
    if cfg.has_local:
        parts["loc_s"] = local_loss(out.m_hat, out.h_s, tau)
        parts["loc_t"] = local_loss(out.m_hat, out.h_t, tau)
        loss = loss + cfg.w_cap * (parts["loc_s"] + parts["loc_t"])
    if cfg.has_cv:
        s_bar, z_bar = slot_vision_summaries(out.cv_slots, out.cv_tokens, out.visual_mask, cfg.cv_norm)
        cv_ids = ids
        if cfg.cv_batch == "gathered":
            s_bar, z_bar, cv_ids = g(s_bar), g(z_bar), all_ids
        parts["cv"] = soft_cross_entropy(s_bar @ z_bar.t(), positives(cv_ids, s_bar.shape[0], s_bar.device))
        loss = loss + cfg.w_cv * parts["cv"]
    if cfg.has_reg:
        parts["reg"] = slot_diversity_loss(out.slots)
        loss = loss + cfg.w_reg * parts["reg"]
    logs = {k: p.detach() for k, p in parts.items()}
    logs["loss"] = loss.detach()
    logs["tau"] = torch.as_tensor(tau).detach()
    return loss, logs
