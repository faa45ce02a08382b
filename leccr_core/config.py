"""LECCR hyperparameters in one dataclass (docs: /work/shared/docs/leccr-method.md).

Every choice the method page marks "(ours)" is a field here whose other value gives the public
release's behaviour. Media-dependent defaults (K, slot layers, fusion weight) are left as None
and filled in by ``__post_init__`` from ``media``, so ``LeccrConfig(media="video")`` is right
without repeating them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

# Loss weights used by the release, per benchmark (w_reg, w_cap, w_dstl, w_cv) plus the media
# and slot count that go with them.
BENCHMARK_PRESETS: dict[str, dict] = {
    "multi30k-de": dict(media="image", w_reg=0.05, w_cap=0.01, w_dstl=0.0, w_cv=0.01),
    "multi30k-fr": dict(media="image", w_reg=0.01, w_cap=0.01, w_dstl=0.5, w_cv=0.01),
    "multi30k-cs": dict(media="image", w_reg=0.01, w_cap=0.01, w_dstl=0.5, w_cv=0.01),
    "coco-ja": dict(media="image", w_reg=0.01, w_cap=0.05, w_dstl=0.3, w_cv=0.01),
    "coco-zh": dict(media="image", w_reg=0.01, w_cap=0.01, w_dstl=0.5, w_cv=0.01),
    # (ours) CLIP frames at CLIP's native 224 px: only each frame's CLS token is used, so the
    # 384 px grid of the image setting buys nothing but cost.
    "msrvtt-cn": dict(media="video", n_slots=2, w_reg=0.03, w_cap=0.01, w_dstl=0.3, w_cv=0.01,
                      image_size=224),
    # (ours) The release ships no VATEX config; its one video config (MSR-VTT-CN) is taken.
    "vatex-zh": dict(media="video", n_slots=2, w_reg=0.03, w_cap=0.01, w_dstl=0.3, w_cv=0.01,
                     image_size=224),
}
# Epochs per benchmark, from the release's run scripts (run_multi30k.sh: fr 70, de/cs 50;
# run_mscoco.sh runs zh with --epoch 70; run_video.sh: 50). COCO ja and VATEX have no run
# line: the configs' schedule (50) is taken.
BENCHMARK_EPOCHS: dict[str, int] = {"multi30k-de": 50, "multi30k-fr": 70, "multi30k-cs": 50, "coco-ja": 50,
                                    "coco-zh": 70, "msrvtt-cn": 50, "vatex-zh": 50}
# What the release does where the method page (and so our default) chooses otherwise. Model side:
RELEASE_MODEL: dict = dict(cv_norm="release", slot_init="zeros", kl_orientation="release", gather_grad="local")
# ... its video setting: pre-extracted 4096-d frame features (d is read from the features), one
# frame self-attention layer, and L_cv on each rank's batch (its video loss does not gather).
RELEASE_VIDEO: dict = dict(video_input="features", n_frame_layers=1, cv_batch="rank")
# ... and the optimiser: `init_params` is reset in the release's model, so no parameter gets
# the 2x lr; no gradient clipping; fp32 (no autocast).
RELEASE_TRAIN: dict = dict(proj_lr_mult=1.0, grad_clip=0.0, precision="fp32")
RELEASE_PREFIX = "release-"

# Ablations (`--ablate NAME`): each removes a part of the method *and its parameters*, so a
# DDP run never holds a parameter without a gradient.
ABLATIONS: dict[str, str] = {
    "slots": "no slot branch at all (no description input, no slots, no enhancement, no local "
             "embeddings, no L_loc / L_cv / L_reg); KL target global-only; global-only scores",
    "descriptions": "slots are the learned queries alone (no description input, no slot generator)",
    "softened": "no KL: w_dstl = 0, so the full ITC(v, h_t)",
    "local": "no local branch (M^, m^): no L_loc, KL target global-only, global-only scores",
    "cv": "no slot-vision alignment L_cv (and no L_cv projections)",
    "reg": "no slot diversity term L_reg",
}


def preset_names() -> list[str]:
    return sorted(BENCHMARK_PRESETS) + sorted(RELEASE_PREFIX + n for n in BENCHMARK_PRESETS)


def resolve_preset(name: str) -> tuple[dict, dict]:
    """A preset name -> (LeccrConfig overrides, TrainConfig overrides).

    ``<bench>``: the benchmark's loss weights and epochs, every other setting the method
    page's. ``release-<bench>``: the same plus every setting in which the public release differs
    (RELEASE_MODEL, RELEASE_TRAIN; RELEASE_VIDEO for video benchmarks)."""
    release = name.startswith(RELEASE_PREFIX)
    bench = name[len(RELEASE_PREFIX):] if release else name
    if bench not in BENCHMARK_PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    model, train = dict(BENCHMARK_PRESETS[bench]), {"epochs": BENCHMARK_EPOCHS[bench]}
    if release:
        model.update(RELEASE_MODEL)
        train.update(RELEASE_TRAIN)
        if model["media"] == "video":
            model.update(RELEASE_VIDEO)
            model.pop("image_size", None)      # no vision tower
    return model, train


@dataclass
class LeccrConfig:
    # --- encoders -------------------------------------------------------------------------
    media: Literal["image", "video"] = "image"
    vision_model: str = "openai/clip-vit-base-patch32"
    text_model: str = "bert-base-multilingual-cased"
    image_size: int = 384          # 384 px: CLIP's 7x7 grid is resized bicubically to 12x12
    # video: "clip_frames" runs the CLIP tower on every valid frame and keeps its projected CLS
    # (ours, the page's "natural modern choice"); "features" takes pre-extracted per-frame
    # features of width d (the release: 2D CNN features, d = 4096) and loads no vision tower.
    video_input: Literal["clip_frames", "features"] = "clip_frames"
    d: int = 512                   # visual width (CLIP projection dim; 4096 for release video)
    text_width: int = 768          # multilingual BERT hidden size
    embed_dim: int = 256           # joint embedding size

    # --- descriptions and captions ----------------------------------------------------------
    desc_max_tokens: int = 200     # enforced in the model too, at train *and* test time
    caption_max_words: int = 30
    desc_no_grad: bool = True      # descriptions are inputs: BERT runs under no_grad for them
    # Several descriptions ("views") per item (ours; the release has one per item). "concat":
    # the slot queries attend to the tokens of all views at once; "mean": slots are generated
    # per view and averaged over the item's non-empty views. Identical for one view.
    desc_views: Literal["concat", "mean"] = "concat"

    # --- slots and interaction ------------------------------------------------------------
    n_slots: int | None = None         # K: 4 images, 2 video
    n_slot_layers: int | None = None   # 3 images, 2 video
    n_enhance_layers: int = 2          # Z^_v = CA(Z_v, M)
    n_local_layers: int = 2            # M^ = CA(M, Z_v)
    n_frame_layers: int = 1            # video only: self-attention over frames
    n_heads: int = 8
    dropout: float = 0.1
    # (ours) "random": small normal init so slots differ from step 0; "zeros": the release,
    # where all K slots start identical (and stay so except for dropout noise).
    slot_init: Literal["random", "zeros"] = "random"
    slot_init_std: float = 0.02

    # --- temperature ------------------------------------------------------------------------
    # Stored raw (not as a log) and clamped in place before each forward, as ALBEF-style code
    # does: with AdamW at lr ~2e-5 a raw tau moves at the release's pace; a log-parametrised
    # one would move ~1/tau times slower. In-place clamping never leaves a zero gradient behind.
    tau_init: float = 0.07
    tau_min: float = 0.001
    tau_max: float = 0.5

    # --- losses -----------------------------------------------------------------------------
    w_reg: float = 0.01
    w_cap: float = 0.01
    w_dstl: float = 0.5
    w_cv: float = 0.01
    alpha: float = 0.8             # English-guidance mix: global vs local similarity
    # (ours) None = the release: no temperature on either side of the KL (P is very flat).
    # A float divides both the target and the prediction logits.
    kl_temperature: float | None = None
    # (ours) "consistent": the slot term is [caption, item] like h_s v^T; "release": it is
    # [item, caption] and added untransposed, as the release does.
    kl_orientation: Literal["consistent", "release"] = "consistent"
    # (ours) How gathered terms send gradients back (see distributed.gather_with_grad): "sum"
    # makes a DDP run optimise the same objective as one process on the global batch;
    # "local" is the plain all_gather + put-back trick, whose gathered terms end up scaled by
    # 1/world_size relative to the per-rank terms (local loss, L_reg) once DDP averages.
    gather_grad: Literal["sum", "local"] = "sum"
    # L_cv's normalisation. "feature" (the method page): each slot / token vector is L2-normalised
    # over its d features, so sim(i, j) is a mean cosine. "release": F.normalize's default dim=1
    # on [B, K, d] / [B, N, d], i.e. over the slot (token) axis per feature: a different
    # objective with larger logits. Padding frames are left out in both (ours).
    cv_norm: Literal["feature", "release"] = "feature"
    # L_cv's batch: "gathered" over ranks (the method page, the release's images) or "rank"
    # (the release's video loss).
    cv_batch: Literal["gathered", "rank"] = "gathered"

    # --- ablations ----------------------------------------------------------------------------
    # Names from ABLATIONS. An ablated part is not built (no parameters) and not computed.
    ablate: tuple[str, ...] = ()

    # --- evaluation ---------------------------------------------------------------------------
    # Score = (1 - w) mm(S_g) + w mm(S_l); the release: 0 for images, 0.1 for video.
    fusion_weight: float | None = None

    def __post_init__(self):
        video = self.media == "video"
        self.ablate = tuple(sorted(set(self.ablate)))
        unknown = [a for a in self.ablate if a not in ABLATIONS]
        if unknown:
            raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(ABLATIONS)}")
        if "softened" in self.ablate:
            self.w_dstl = 0.0
        if not self.has_local:
            self.fusion_weight = 0.0           # no local embeddings: global-only scores
        if self.n_slots is None:
            self.n_slots = 2 if video else 4
        if self.n_slot_layers is None:
            self.n_slot_layers = 2 if video else 3
        if self.fusion_weight is None:
            self.fusion_weight = 0.1 if video else 0.0
        self.validate()

    def validate(self) -> None:
        choices = {"media": ("image", "video"), "video_input": ("clip_frames", "features"),
                   "desc_views": ("concat", "mean"), "slot_init": ("random", "zeros"),
                   "kl_orientation": ("consistent", "release"), "gather_grad": ("sum", "local"),
                   "cv_norm": ("feature", "release"), "cv_batch": ("gathered", "rank")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LeccrConfig.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.d % self.n_heads:
            raise ValueError(f"d={self.d} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError("alpha and fusion_weight must lie in [0, 1]")
        if not 0.0 < self.tau_min <= self.tau_init <= self.tau_max:
            raise ValueError("need 0 < tau_min <= tau_init <= tau_max")
        if self.kl_temperature is not None and self.kl_temperature <= 0:
            raise ValueError("kl_temperature must be positive or None")
        if not self.has_local and self.fusion_weight > 0:
            raise ValueError("fusion_weight > 0 needs the local branch (it is ablated)")
        if self.uses_descriptions and self.n_slot_layers < 1:
            raise ValueError("n_slot_layers must be >= 1 (slots from learned queries only: --ablate descriptions)")
        if self.has_slots and self.n_slots < 1:
            raise ValueError("n_slots must be >= 1 (no slots at all: --ablate slots)")

    # --- what the ablations leave ----------------------------------------------------------------
    @property
    def has_slots(self) -> bool:
        """The slot branch exists (slots M, enhancement Z^_v = CA(Z_v, M))."""
        return "slots" not in self.ablate

    @property
    def uses_descriptions(self) -> bool:
        """Slots are generated from descriptions (else: the learned queries alone, or no slots)."""
        return self.has_slots and "descriptions" not in self.ablate

    @property
    def has_local(self) -> bool:
        """Local embeddings m^ = Linear(CA(M, Z_v)) exist: L_loc, the KL's slot term, fused scores."""
        return self.has_slots and "local" not in self.ablate

    @property
    def has_cv(self) -> bool:
        return self.has_slots and "cv" not in self.ablate

    @property
    def has_reg(self) -> bool:
        return self.has_slots and "reg" not in self.ablate

    @property
    def has_kl(self) -> bool:
        return "softened" not in self.ablate

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LeccrConfig":
        """The model side of a preset (see resolve_preset; the train side is TrainConfig's)."""
        return cls(**{**resolve_preset(name)[0], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ablate"] = list(self.ablate)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LeccrConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LeccrConfig fields: {sorted(unknown)}")
        return cls(**{**d, "ablate": tuple(d.get("ablate") or ())})
