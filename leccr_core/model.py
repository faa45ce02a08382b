"""The LECCR model: CLIP vision tower + multilingual BERT + multi-view semantic slots.

One file, as nanoGPT: the cross-attention layer, the model, and the encoder loading.
Shapes: B items (batch rows), N visual tokens (145 for a 384 px image; T frames for video),
K slots, L description tokens, V descriptions ("views") per item, d visual width,
w text width (768), e embedding size (256).
Masks follow the transformers convention: 1/True = a real token, 0/False = padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LeccrConfig


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention, the one block form of the method:
        a  = MHA(q = x, k = v = mem)
        x' = LayerNorm(x + Dropout(W2 Dropout(GELU(W1 a))))
    The residual is the query input x; there is deliberately no residual/norm around ``a``
    (unlike a standard transformer layer) and no positional embedding anywhere."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, mem_mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, Q, d] queries; mem: [B, S, d]; mem_mask: [B, S] (1 = valid) or None
        pad = None if mem_mask is None else ~mem_mask.bool()  # MHA wants True = ignore
        a, _ = self.attn(x, mem, mem, key_padding_mask=pad, need_weights=False)  # [B, Q, d]
        return self.norm(x + self.drop2(self.w2(self.drop1(F.gelu(self.w1(a))))))


@dataclass
class LeccrOutput:
    """Named embeddings of one forward (open_clip style); losses take what they need."""
    z_v: torch.Tensor                   # [B, N, d] visual tokens Z_v (video: after frame self-attn)
    visual_mask: torch.Tensor | None    # [B, N] bool, video only (valid frames)
    # None where cfg.ablate removed the part that makes them
    slots: torch.Tensor | None          # [B, K, d] M, before interaction
    z_v_hat: torch.Tensor               # [B, N, d] Z^_v = CA(Z_v, M) (Z_v without slots)
    m_local: torch.Tensor | None        # [B, K, d] M^ = CA(M, Z_v)
    m_hat: torch.Tensor | None          # [B, K, e] local embeddings (not L2-normalised)
    v_hat: torch.Tensor                 # [B, e] global visual embedding, L2-normalised
    cv_slots: torch.Tensor | None       # [B, K, d] slot-vision projection of M (for L_cv)
    cv_tokens: torch.Tensor | None      # [B, N, d] slot-vision projection of Z_v (for L_cv)
    tau: torch.Tensor                   # [] temperature
    h_s: torch.Tensor | None = None     # [B, e] English caption embedding, L2-normalised
    h_t: torch.Tensor | None = None     # [B, e] target-language caption embedding


def resize_clip_positions(vision: nn.Module, image_size: int) -> None:
    """Resize a CLIP vision tower's position table, in place, for ``image_size`` inputs.

    The patch grid (7x7 for 224 px / patch 32) is interpolated bicubically to the new grid
    (12x12 at 384 px: 1 CLS + 144 = 145 positions); the CLS position is kept. Done once at
    load time so the fine-tuned table *is* the 12x12 one (as the release's checkpoints are),
    rather than re-interpolating the 7x7 table at every forward.
    """
    emb = vision.vision_model.embeddings if hasattr(vision, "vision_model") else vision.embeddings
    old = emb.position_embedding.weight.data                  # [1 + g*g, w]
    g_old = int(round((old.shape[0] - 1) ** 0.5))
    g_new = image_size // emb.patch_size
    cls_pos, grid = old[:1], old[1:]
    grid = grid.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)            # [1, w, g, g]
    grid = F.interpolate(grid.float(), size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.to(old.dtype).permute(0, 2, 3, 1).reshape(g_new * g_new, -1)
    new = torch.cat([cls_pos, grid], 0)                       # [1 + g_new^2, w]

    emb.position_embedding = nn.Embedding(new.shape[0], new.shape[1], device=new.device, dtype=new.dtype)
    emb.position_embedding.weight.data.copy_(new)
    emb.num_patches = g_new * g_new
    emb.num_positions = new.shape[0]
    emb.image_size = image_size
    emb.position_ids = torch.arange(new.shape[0], device=new.device).expand(1, -1)  # buffer
    vision.config.image_size = image_size
    emb.config.image_size = image_size


class LeccrModel(nn.Module):
    """LECCR over already-built encoders (tests pass tiny random ones).

    vision: a transformers ``CLIPVisionModelWithProjection`` (or None for video features);
    text: a BERT-like ``AutoModel`` whose last_hidden_state[:, 0] is [CLS]; it is shared by
    English captions, target captions and descriptions.
    """

    def __init__(self, cfg: LeccrConfig, vision: nn.Module | None, text: nn.Module):
        super().__init__()
        self.cfg = cfg
        d, e, K = cfg.d, cfg.embed_dim, cfg.n_slots
        video = cfg.media == "video"
        self.uses_vision_tower = not (video and cfg.video_input == "features")
        if self.uses_vision_tower:
            if vision is None:
                raise ValueError("a CLIP vision tower is needed unless media='video' and video_input='features'")
            if vision.config.projection_dim != d:
                raise ValueError(f"cfg.d={d} but the CLIP projection dim is {vision.config.projection_dim}")
            if vision.config.image_size != cfg.image_size:
                resize_clip_positions(vision, cfg.image_size)
        self.vision = vision if self.uses_vision_tower else None
        if text.config.hidden_size != cfg.text_width:
            raise ValueError(f"cfg.text_width={cfg.text_width} but the text encoder has {text.config.hidden_size}")
        if getattr(text, "pooler", None) is not None:
            # only [CLS] is used; an unused pooler would need DDP's find_unused_parameters
            text.pooler = None
        self.text = text

        layer = lambda: CrossAttentionLayer(d, cfg.n_heads, cfg.dropout)  # noqa: E731
        if video:
            self.frame_layers = nn.ModuleList([layer() for _ in range(cfg.n_frame_layers)])
        # Ablated parts are not built at all (cfg.ablate), so under DDP no parameter is ever
        # left without a gradient.
        if cfg.uses_descriptions:
            self.desc_proj = nn.Linear(cfg.text_width, d)             # D' = Linear(768 -> d)(D)
            self.slot_layers = nn.ModuleList([layer() for _ in range(cfg.n_slot_layers)])
        if cfg.has_slots:
            self.slot_queries = nn.Parameter(torch.zeros(K, d))       # Q
            if cfg.slot_init == "random":
                nn.init.trunc_normal_(self.slot_queries, std=cfg.slot_init_std)
            self.enhance_layers = nn.ModuleList([layer() for _ in range(cfg.n_enhance_layers)])
        if cfg.has_local:
            self.local_layers = nn.ModuleList([layer() for _ in range(cfg.n_local_layers)])
            self.local_proj = nn.Linear(d, e)                         # m^_k
        self.visual_proj = nn.Linear(d, e)                            # v^
        self.text_proj = nn.Linear(cfg.text_width, e)                 # h
        if cfg.has_cv:
            self.cv_slot_proj = nn.Linear(d, d)                       # L_cv, slot side
            self.cv_token_proj = nn.Linear(d, d)                      # L_cv, visual side
        self.tau = nn.Parameter(torch.tensor(cfg.tau_init))

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained_encoders(cls, cfg: LeccrConfig, **hf_kwargs) -> "LeccrModel":
        """Load CLIP's vision tower + visual projection and the text encoder, then build the
        model (new layers randomly initialised). Positions are resized to cfg.image_size."""
        from transformers import AutoModel
        vision = None
        if not (cfg.media == "video" and cfg.video_input == "features"):
            vision = load_clip_vision(cfg.vision_model, **hf_kwargs)
        text = AutoModel.from_pretrained(cfg.text_model, **hf_kwargs)
        return cls(cfg, vision, text)

    # ---- encoders ------------------------------------------------------------------------
    def clip_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> every token through CLIP's post layer norm and projection
        [B, 1 + H/p * W/p, d] (CLS first)."""
        hidden = self.vision.vision_model(pixel_values=pixels).last_hidden_state   # [B, N, w_clip]
        return self.vision.visual_projection(self.vision.vision_model.post_layernorm(hidden))

    def encode_frames(self, visual: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Video -> (Z_v [B, T, d], mask [B, T] bool). visual is frames [B, T, 3, H, W] (CLIP
        runs on valid frames only; its projected CLS is the frame feature) or pre-extracted
        features [B, T, d]. Then frame self-attention over valid frames."""
        B, T = visual.shape[:2]
        mask = torch.ones(B, T, dtype=torch.bool, device=visual.device) if mask is None else mask.bool()
        if self.uses_vision_tower:
            feats = visual.new_zeros(B, T, self.cfg.d)
            # projected CLS per frame (= clip_tokens(...)[:, 0]); padded frames never run
            feats[mask] = self.vision(pixel_values=visual[mask]).image_embeds
        else:
            feats = visual
        for blk in self.frame_layers:
            feats = blk(feats, feats, mask)                       # self-attention: mem = x
        return feats, mask

    def encode_descriptions(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Description tokens [..., L] -> BERT token features [..., L', w], L' <= desc_max_tokens.
        Truncated here so train and test see the same length (a flaw of the release)."""
        ids, mask = ids[..., :self.cfg.desc_max_tokens], mask[..., :self.cfg.desc_max_tokens]
        shape = ids.shape
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.desc_no_grad):
            out = self.text(input_ids=ids.reshape(-1, shape[-1]), attention_mask=mask.reshape(-1, shape[-1]))
        feats = out.last_hidden_state.reshape(*shape, -1)
        # zero padded positions: attention gives them weight 0, but 0 * NaN (e.g. from an
        # all-padding view) would still poison the slots
        return feats.masked_fill(~mask.bool().unsqueeze(-1), 0.0)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Captions [B, L] -> h [B, e] = normalize(Linear(BERT [CLS]))."""
        cls_tok = self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        return F.normalize(self.text_proj(cls_tok), dim=-1)

    # ---- slots -----------------------------------------------------------------------------
    def make_slots(self, desc: torch.Tensor, desc_mask: torch.Tensor) -> torch.Tensor:
        """desc [B, L, w] (one view or views concatenated), desc_mask [B, L] -> M [B, K, d]."""
        mem = self.desc_proj(desc)                                 # D' [B, L, d]
        x = self.slot_queries.unsqueeze(0).expand(desc.shape[0], -1, -1)
        for blk in self.slot_layers:
            x = blk(x, mem, desc_mask)
        return x

    def slots_from_descriptions(self, desc: torch.Tensor, desc_mask: torch.Tensor) -> torch.Tensor:
        """desc [B, L, w] or [B, V, L, w] with desc_mask [B, L] / [B, V, L] -> M [B, K, d].
        Several views: "concat" joins all tokens; "mean" averages per-view slots over the
        item's non-empty views (an all-padding view is a missing view)."""
        if desc.dim() == 3:
            return self.make_slots(desc, desc_mask)
        B, V, L, w = desc.shape
        if self.cfg.desc_views == "concat":
            return self.make_slots(desc.reshape(B, V * L, w), desc_mask.reshape(B, V * L))
        valid = desc_mask.bool().any(-1)                           # [B, V]
        flat_valid = valid.reshape(-1)
        slots = desc.new_zeros(B * V, self.cfg.n_slots, self.cfg.d)
        # run only real views: an all-masked view would make attention NaN
        slots[flat_valid] = self.make_slots(desc.reshape(B * V, L, w)[flat_valid],
                                            desc_mask.reshape(B * V, L)[flat_valid])
        slots = slots.reshape(B, V, *slots.shape[1:])
        wv = valid.to(slots.dtype)[..., None, None]                # [B, V, 1, 1]
        return (slots * wv).sum(1) / wv.sum(1).clamp_min(1.0)

    # ---- forward ---------------------------------------------------------------------------
    def encode_visual(self, visual: torch.Tensor, desc_ids: torch.Tensor | None = None,
                      desc_mask: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
                      desc_feats: torch.Tensor | None = None) -> LeccrOutput:
        """Item side. visual: images [B, 3, H, W]; video frames [B, T, 3, H, W] or features
        [B, T, d] with visual_mask [B, T]. Descriptions as token ids [B, (V,) L] or as
        precomputed BERT features desc_feats [B, (V,) L, w], with desc_mask [B, (V,) L]."""
        # Clamp the raw tau in place through .data: it keeps tau in range without leaving a
        # zero-gradient clamp in the graph, and without bumping autograd's version counter
        # (a plain in-place clamp would break a backward through an earlier forward's loss).
        self.tau.data.clamp_(self.cfg.tau_min, self.cfg.tau_max)
        if self.cfg.media == "video":
            z_v, vmask = self.encode_frames(visual, visual_mask)   # [B, T, d], [B, T]
        else:
            z_v, vmask = self.clip_tokens(visual), None           # [B, 145, d]
        cfg = self.cfg
        B = z_v.shape[0]
        slots = z_hat = m_loc = m_hat = None
        if cfg.uses_descriptions:
            if desc_feats is None:
                desc_feats = self.encode_descriptions(desc_ids, desc_mask)  # [B, (V,) L, w]
            else:
                desc_feats = desc_feats[..., :cfg.desc_max_tokens, :]
            desc_mask = desc_mask[..., :desc_feats.shape[-2]]
            slots = self.slots_from_descriptions(desc_feats, desc_mask)   # M [B, K, d]
        elif cfg.has_slots:                                         # ablated descriptions: M = Q
            slots = self.slot_queries.unsqueeze(0).expand(B, -1, -1)

        z_hat = z_v
        if slots is not None:
            for blk in self.enhance_layers:                       # visual tokens query slots
                z_hat = blk(z_hat, slots)
        if cfg.has_local:
            m_loc = slots
            for blk in self.local_layers:                         # slots query *original* Z_v
                m_loc = blk(m_loc, z_v, vmask)
            m_hat = self.local_proj(m_loc)

        if vmask is None:
            pooled = z_hat[:, 0]                                  # CLS of Z^_v
        else:
            fm = vmask.to(z_hat.dtype).unsqueeze(-1)               # masked mean over frames
            pooled = (z_hat * fm).sum(1) / fm.sum(1).clamp_min(1.0)
        return LeccrOutput(
            z_v=z_v, visual_mask=vmask, slots=slots, z_v_hat=z_hat, m_local=m_loc, m_hat=m_hat,
            v_hat=F.normalize(self.visual_proj(pooled), dim=-1),
            cv_slots=self.cv_slot_proj(slots) if cfg.has_cv else None,
            cv_tokens=self.cv_token_proj(z_v) if cfg.has_cv else None,
            tau=self.tau,
        )

    def forward(self, visual: torch.Tensor, desc_ids: torch.Tensor | None = None,
                desc_mask: torch.Tensor | None = None, src_ids: torch.Tensor | None = None,
                src_mask: torch.Tensor | None = None, tgt_ids: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, visual_mask: torch.Tensor | None = None,
                desc_feats: torch.Tensor | None = None) -> LeccrOutput:
        """One training row per item: its English caption (src) and its translation (tgt)."""
        out = self.encode_visual(visual, desc_ids, desc_mask, visual_mask, desc_feats)
        if src_ids is not None:
            out.h_s = self.encode_text(src_ids, src_mask)
        if tgt_ids is not None:
            out.h_t = self.encode_text(tgt_ids, tgt_mask)
        return out


def load_clip_vision(name_or_path: str, **hf_kwargs) -> nn.Module:
    """CLIPVisionModelWithProjection from a vision-only or a full CLIP checkpoint.

    For a full CLIP checkpoint (such as openai/clip-vit-base-patch32) the projection size lives
    on the top-level config, not on vision_config, so it is copied over; otherwise a
    non-512 projection would be silently re-initialised at the wrong size.
    """
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    config = AutoConfig.from_pretrained(name_or_path, **hf_kwargs)
    if config.model_type == "clip":
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        config = vision_config
    return CLIPVisionModelWithProjection.from_pretrained(name_or_path, config=config, **hf_kwargs)


def load_tokenizer(cfg: LeccrConfig, **hf_kwargs):
    """The text encoder's tokenizer (shared by captions and descriptions)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(cfg.text_model, **hf_kwargs)
