"""Embed an evaluation split and score it: item embeddings (v^, m^), caption embeddings (h),
score matrices fused as the config says, retrieval metrics and per-query ranks."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .data import (CaptionDataset, DataConfig, DescFeatureCache, EvalSet, ItemDataset, collate_captions,
                   collate_items, loader_generator)
from .metrics import fuse_scores, global_scores, local_scores, retrieval_metrics, retrieval_ranks


@dataclass
class Embeddings:
    v_hat: torch.Tensor            # [I, e] items, L2-normalised
    m_hat: torch.Tensor | None     # [I, K, e] local (slot) embeddings; None: local branch ablated
    h: torch.Tensor                # [C, e] captions
    caption_item: torch.Tensor     # [C] index of each caption's item


@dataclass
class RankResult:
    metrics: dict[str, float]
    t2v: torch.Tensor              # [C] rank of each caption's item
    v2t: torch.Tensor              # [I'] best rank of each captioned item's captions
    v2t_items: torch.Tensor        # [I'] indices of those items


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@contextmanager
def eval_mode(model):
    """The model in eval mode for the block; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _loader_args(device: torch.device, batch_size: int, num_workers: int) -> dict:
    return dict(batch_size=batch_size, num_workers=num_workers, shuffle=False, generator=loader_generator(0),
                pin_memory=device.type == "cuda")


@torch.no_grad()
def embed_items(model, items: list, tokenizer, data_cfg: DataConfig, device: torch.device | str = "cpu",
                batch_size: int = 128, num_workers: int = 0, autocast=None,
                desc_cache: DescFeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ItemRecords -> (v_hat [I, e], m_hat [I, K, e] or None), in eval mode (the mode is restored)."""
    device = torch.device(device)
    autocast = autocast or nullcontext
    v_parts, m_parts = [], []
    loader = torch.utils.data.DataLoader(ItemDataset(items, tokenizer, data_cfg, desc_cache),
                                         collate_fn=collate_items, **_loader_args(device, batch_size, num_workers))
    with eval_mode(model):
        for batch in loader:
            b = _to_device(batch, device)
            with autocast():
                out = model.encode_visual(b["visual"], b.get("desc_ids"), b.get("desc_mask"), b["visual_mask"],
                                          b.get("desc_feats"))
            v_parts.append(out.v_hat.float().cpu())
            if out.m_hat is not None:
                m_parts.append(out.m_hat.float().cpu())
    return torch.cat(v_parts), torch.cat(m_parts) if m_parts else None


@torch.no_grad()
def embed_captions(model, captions: list, tokenizer, data_cfg: DataConfig, device: torch.device | str = "cpu",
                   batch_size: int = 128, num_workers: int = 0, autocast=None) -> torch.Tensor:
    """CaptionRecords -> h [C, e] (the caption preprocessing of training), in eval mode."""
    device = torch.device(device)
    autocast = autocast or nullcontext
    h_parts = []
    loader = torch.utils.data.DataLoader(CaptionDataset(captions, tokenizer, data_cfg), collate_fn=collate_captions,
                                         **_loader_args(device, batch_size, num_workers))
    with eval_mode(model):
        for batch in loader:
            b = _to_device(batch, device)
            with autocast():
                h = model.encode_text(b["ids"], b["mask"])
            h_parts.append(h.float().cpu())
    return torch.cat(h_parts)


def embed(model, evalset: EvalSet, tokenizer, data_cfg: DataConfig, device: torch.device | str = "cpu",
          batch_size: int = 128, num_workers: int = 0, autocast=None,
          desc_cache: DescFeatureCache | None = None) -> Embeddings:
    """Run the model once over the split's items and captions (eval mode; the mode is restored)."""
    common = dict(device=device, batch_size=batch_size, num_workers=num_workers, autocast=autocast)
    v_hat, m_hat = embed_items(model, evalset.items, tokenizer, data_cfg, desc_cache=desc_cache, **common)
    h = embed_captions(model, evalset.captions, tokenizer, data_cfg, **common)
    return Embeddings(v_hat=v_hat, m_hat=m_hat, h=h,
                      caption_item=torch.tensor([c.item for c in evalset.captions], dtype=torch.long))


def score(emb: Embeddings, fusion_weight: float) -> torch.Tensor:
    """[C, I] = (1 - w) mm(S_g) + w mm(S_l) (w = 0: S_g alone; S_l is not computed)."""
    s_g = global_scores(emb.h, emb.v_hat)
    if fusion_weight > 0 and emb.m_hat is None:
        raise ValueError("fusion weight > 0 needs local embeddings, and this model's local branch is ablated")
    s_l = local_scores(emb.h, emb.m_hat) if fusion_weight > 0 else None
    return fuse_scores(s_g, s_l, fusion_weight)


def rank(emb: Embeddings, fusion_weight: float) -> RankResult:
    scores = score(emb, fusion_weight)
    t2v, v2t = retrieval_ranks(scores, emb.caption_item)
    has_caption = torch.bincount(emb.caption_item, minlength=scores.shape[1]) > 0
    return RankResult(metrics=retrieval_metrics(scores, emb.caption_item), t2v=t2v, v2t=v2t,
                      v2t_items=has_caption.nonzero().flatten())
