"""Tiny random encoders and configs for the leccr_core tests (no hub access)."""

from __future__ import annotations

import torch

from leccr_core.config import LeccrConfig
from leccr_core.model import LeccrModel

D, TEXT_W, EMB = 32, 32, 16
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "##s", "the", "on",
         "grass", "ein", "hund", "läuft", "auf", "dem", "gras", "red", "ball", "man", "with"]


def tiny_clip(image_size=32, patch_size=16, projection_dim=D):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=projection_dim))


def tiny_bert(vocab_size=len(VOCAB)):
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=TEXT_W, num_hidden_layers=1,
                                num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))


def tiny_cfg(**kw) -> LeccrConfig:
    base = dict(d=D, text_width=TEXT_W, embed_dim=EMB, image_size=64, desc_max_tokens=40)
    return LeccrConfig(**{**base, **kw})


def tiny_model(seed=0, **kw) -> LeccrModel:
    torch.manual_seed(seed)
    cfg = tiny_cfg(**kw)
    vision = None if (cfg.media == "video" and cfg.video_input == "features") else tiny_clip()
    return LeccrModel(cfg, vision, tiny_bert())


def tokens(B, L, seed=0, lengths=None):
    """Random token ids [B, L] starting with [CLS]; row b has lengths[b] real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (B, L), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, L, dtype=torch.long)
    if lengths is not None:
        for b, n in enumerate(lengths):
            ids[b, n:] = 0
            mask[b, n:] = 0
    return ids, mask
