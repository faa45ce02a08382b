"""The LECCR training loop: one function for one process and for every rank of a DDP run.

Optimisation as the method page gives it: AdamW (lr 1e-5, weight decay 0.01 except on biases
and norms, betas (0.9, 0.98), eps 1e-8), 2x lr on the joint-space projections and tau, linear
warm-up over 10% of the steps then linear decay, per step; seed 42. Ours: gradient clipping
(max norm 1.0), bf16 autocast on GPUs that support it (else fp16 with a gradient scaler).

Exact resume: batches are a pure function of (seed, epoch, position) (data.EpochBatches),
augmentations of (seed, epoch, sample) (data.sample_rng), DataLoaders draw from their own
generators, and a checkpoint holds every rank's RNG state plus the data position, so a
resumed run replays the uninterrupted run's steps bit for bit (same device and world size).

Distributed: the caller (Ray Train's TorchTrainer, or torchrun) initialises torch.distributed;
this loop wraps the model in DDP, gives rank r rows [r B/W, (r+1) B/W) of each global batch
(so gathered terms see the one-process batch in the same order), logs rank-averaged values,
and lets rank 0 alone evaluate and write checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import LeccrConfig
from .data import (DataConfig, DescFeatureCache, EpochBatches, EvalSet, ItemRecord, PairRecord, TrainDataset,
                   batches_per_epoch, collate_train, loader_generator)
from .evaluate import embed, rank
from .losses import total_loss
from .model import LeccrModel, load_tokenizer

# Parameter names (of LeccrModel) that get proj_lr_mult x lr: the two heads into the joint
# embedding space and the temperature.
FAST_LR_PARAMS = ("text_proj", "visual_proj", "tau")
# Values of a step's log line that are averaged over ranks (those the config's ablations leave).
PART_NAMES = ("loss", "itc_vs", "itc_vt", "kl", "itc_st", "loc_s", "loc_t", "cv", "reg", "tau")


@dataclass
class TrainConfig:
    epochs: int = 60
    max_steps: int | None = None          # caps the run (and the schedule) at this many steps
    batch_size: int = 128                 # global: split over ranks
    lr: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    proj_lr_mult: float = 2.0
    fast_lr_params: tuple[str, ...] = FAST_LR_PARAMS
    warmup_frac: float = 0.1
    grad_clip: float = 1.0                # max global grad norm (ours); 0 = no clipping
    precision: str = "auto"               # auto (GPU: bf16 if supported else fp16; CPU: fp32) | fp32 | bf16 | fp16
    seed: int = 42
    num_workers: int = 2                  # DataLoader workers per rank
    eval_every_steps: int | None = None   # None: after every epoch
    save_every_steps: int | None = None   # also write last.pt every N steps (always at evaluations)
    stop_after_steps: int | None = None   # save and stop at this step (the schedule still spans the run)
    eval_batch_size: int = 128
    cache_desc_features: bool = False     # frozen pretrained description encoder, features cached
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    threads: int | None = None            # torch intra-op threads per rank (None: torch's default)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.fast_lr_params = tuple(self.fast_lr_params)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r}; expected auto, fp32, bf16 or fp16")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (contrastive losses need negatives)")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError("warmup_frac must lie in [0, 1)")
        if self.epochs < 1 and self.max_steps is None:
            raise ValueError("epochs must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields whose change makes a resumed run a different run (the others, e.g. stop_after_steps
# or num_workers, may differ between the interrupted and the resumed invocation).
RESUME_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "betas", "eps", "proj_lr_mult",
                 "fast_lr_params", "warmup_frac", "grad_clip", "precision", "seed", "cache_desc_features")


# ---------------------------------------------------------------------------- optimiser

def _is_fast(name: str, fast: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fast)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Four AdamW groups: {base, fast} x {decay, no decay}. No weight decay on biases, norm
    weights, tau and other vectors (any parameter with fewer than 2 dims); fast = names in
    cfg.fast_lr_params, at proj_lr_mult x lr. Empty groups are left out."""
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        fast, decay = _is_fast(name, cfg.fast_lr_params), p.ndim >= 2
        g = groups.setdefault((fast, decay), {
            "name": f"{'fast' if fast else 'base'}_{'decay' if decay else 'no_decay'}", "params": [], "param_names": [],
            "lr": cfg.lr * (cfg.proj_lr_mult if fast else 1.0), "weight_decay": cfg.weight_decay if decay else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg)
    for g in groups:
        del g["param_names"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


class WarmupLinear:
    """lr factor at step s (0-based) of `total`: (s + 1) / warmup during warm-up, then linear
    decay, (total - s) / (total - warmup), reaching 0 just after the last step. A class (not a
    lambda) so that LambdaLR's state_dict holds its numbers."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = max(1, total), max(0, warmup)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def make_scheduler(optimizer, total_steps: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinear(total_steps, math.ceil(warmup_frac * total_steps)))


def total_steps(n_pairs: int, cfg: TrainConfig) -> int:
    steps = batches_per_epoch(n_pairs, cfg.batch_size) * cfg.epochs
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# ---------------------------------------------------------------------------- precision

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if device.type == "cpu" and precision == "fp16":
            raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_factory(precision: str, device: torch.device) -> Callable:
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------- job

@dataclass
class TrainJob:
    """Everything one rank needs (picklable: Ray sends it to every worker)."""
    model_cfg: LeccrConfig
    data_cfg: DataConfig
    train_cfg: TrainConfig
    items: list[ItemRecord]
    pairs: list[PairRecord]
    val: EvalSet | None
    run_dir: Path                          # last.pt, best.pt
    log_dir: Path                          # train.jsonl, summary.json, tensorboard/
    resume: bool = False
    desc_cache: dict[str, Path] = field(default_factory=dict)   # "train" / "val" -> cache folder
    meta: dict[str, Any] = field(default_factory=dict)           # lang, run name, data counts


def build_model(cfg: LeccrConfig, seed: int) -> LeccrModel:
    """Pretrained encoders + new layers, the new ones initialised from ``seed``."""
    torch.manual_seed(seed)
    return LeccrModel.from_pretrained_encoders(cfg)


class _JsonlLog:
    """train.jsonl (rank 0). On resume, lines past the checkpoint's step are dropped first, so
    the file always holds one trajectory."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step and record.get("event") != "end":
                        kept.append(line)
                except json.JSONDecodeError:
                    continue                       # a line cut by a crash
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _tensorboard(log_dir: Path, notice: Callable[[str], None]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        notice("tensorboard is not installed: per-step logs go to train.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(str(log_dir / "tensorboard"))


class _StopFlag:
    """SIGINT/SIGTERM in a one-process run: finish the step, save last.pt, stop."""

    def __init__(self, enabled: bool):
        self.requested = False
        self._old = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:                       # second signal: the default behaviour
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _gather_rng(world: int) -> list[dict]:
    state = rng_state()
    if world == 1:
        return [state]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------- the loop

def train(job: TrainJob, rank_: int = 0, world: int = 1, device: torch.device | None = None,
          on_step: Callable[[dict], None] | None = None, notice: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) one run; returns the end summary (rank 0; other ranks get {})."""
    tc, mc, dc = job.train_cfg, job.model_cfg, job.data_cfg
    device = device or resolve_device(tc.device)
    notice = notice or (lambda msg: print(f"train: {msg}", file=sys.stderr))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads_before = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        return _train(job, rank_, world, device, on_step, notice, tc, mc, dc)
    finally:
        torch.set_num_threads(threads_before)


def _train(job, rank_, world, device, on_step, notice, tc, mc, dc) -> dict:
    precision = resolve_precision(tc.precision, device)
    autocast = autocast_factory(precision, device)
    lead = rank_ == 0
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    model = build_model(mc, tc.seed).to(device)
    tokenizer = load_tokenizer(mc)
    optimizer = make_optimizer(model, tc)
    steps_total = total_steps(len(job.pairs), tc)
    if steps_total < 1:
        raise ValueError(f"{len(job.pairs)} training rows make no batch of {tc.batch_size}")
    scheduler = make_scheduler(optimizer, steps_total, tc.warmup_frac)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    torch.manual_seed(tc.seed + rank_)           # dropout stream; the model init used tc.seed

    epoch, batch_in_epoch, step = 0, 0, 0
    best = {"rsum": None, "step": None, "metrics": None}
    last_path, best_path = job.run_dir / "last.pt", job.run_dir / "best.pt"
    resumed_from = None
    if job.resume and last_path.is_file():
        ckpt = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        pos = ckpt["position"]
        epoch, batch_in_epoch, step = pos["epoch"], pos["batch"], pos["step"]
        best = ckpt.get("best", best)
        rngs = ckpt.get("rng") or []
        if len(rngs) == world:
            set_rng_state(rngs[rank_])
        elif lead:
            notice(f"checkpoint saved with {len(rngs)} rank(s), resuming on {world}: dropout and sampling "
                   "streams restart (not bit-identical to an uninterrupted run)")
        resumed_from = step
        del ckpt

    desc_caches = {k: DescFeatureCache(v) for k, v in job.desc_cache.items()}
    module = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset = TrainDataset(job.items, job.pairs, tokenizer, dc, tc.seed, desc_caches.get("train"))
    log = tb = None
    if lead:
        log = _JsonlLog(job.log_dir / "train.jsonl", resumed_from if resumed_from is not None else None)
        tb = _tensorboard(job.log_dir, notice)
    stop = _StopFlag(enabled=world == 1)
    n_epochs = math.ceil(steps_total / max(1, batches_per_epoch(len(job.pairs), tc.batch_size)))
    started, samples, first_loss, last_logs = time.time(), 0, None, {}
    halt = False

    def save_last():
        state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "rng": _gather_rng(world), "position": {"epoch": epoch, "batch": batch_in_epoch, "step": step},
                 "best": best, "model_config": mc.to_dict(), "data_config": dc.to_dict(),
                 "train_config": tc.to_dict(), "meta": {**job.meta, "world_size": world, "precision": precision}}
        if lead:
            save_checkpoint(state, last_path)
        return state

    def evaluate_and_select(state_for_best: Callable[[], dict]):
        nonlocal best
        metrics = None
        if lead and job.val is not None:
            emb = embed(module, job.val, tokenizer, dc, device, tc.eval_batch_size, tc.num_workers, autocast,
                        desc_caches.get("val"))
            metrics = rank(emb, mc.fusion_weight).metrics
            record = {"event": "eval", "split": job.val.name, "step": step, "epoch": epoch, **metrics}
            improved = best["rsum"] is None or metrics["rsum"] > best["rsum"]
            if improved:
                best = {"rsum": metrics["rsum"], "step": step, "metrics": metrics}
            record["best"] = improved
            log.write(record)
            if tb:
                for k, v in metrics.items():
                    tb.add_scalar(f"val/{k}", v, step)
        if world > 1:
            flag = [best]
            dist.broadcast_object_list(flag, src=0)
            best = flag[0]
        state = state_for_best()
        if lead and best["step"] == step and job.val is not None:
            save_checkpoint(state, best_path)
        return metrics

    try:
        while step < steps_total:
            batches = EpochBatches(len(job.pairs), tc.batch_size, tc.seed, epoch, rank_, world, batch_in_epoch)
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, collate_fn=collate_train, num_workers=tc.num_workers,
                generator=loader_generator(tc.seed + epoch), pin_memory=device.type == "cuda",
                persistent_workers=False)
            model.train()
            t_step = time.time()
            for batch in loader:
                b = _to_device(batch, device)
                with autocast():
                    out = model(b["visual"], b.get("desc_ids"), b.get("desc_mask"), b["src_ids"], b["src_mask"],
                                b["tgt_ids"], b["tgt_mask"], b["visual_mask"], b.get("desc_feats"))
                    loss, parts = total_loss(out, b["ids"], mc)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = (torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
                             if tc.grad_clip > 0 else
                             torch.nn.utils.clip_grad_norm_(module.parameters(), float("inf")))
                scaler.step(optimizer)
                scaler.update()
                lrs = scheduler.get_last_lr()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_in_epoch += 1
                samples += tc.batch_size

                names = [k for k in PART_NAMES if k in parts]     # the same on every rank
                values = torch.stack([parts[k].float().reshape(()) for k in names]).detach()
                if world > 1:
                    dist.all_reduce(values)
                    values /= world
                now = time.time()
                logs = {"step": step, "epoch": epoch, **{k: v for k, v in zip(names, values.tolist())},
                        "grad_norm": float(grad_norm), "lr": lrs[0], "lr_fast": max(lrs),
                        "samples_per_s": tc.batch_size / max(now - t_step, 1e-9), "time": now}
                t_step = now
                last_logs = logs
                if first_loss is None:
                    first_loss = logs["loss"]
                if lead:
                    log.write(logs)
                    if tb:
                        for k in (*names, "grad_norm", "lr"):
                            tb.add_scalar(f"train/{k}", logs[k], step)
                    if on_step:
                        on_step(logs)

                end_of_epoch = batch_in_epoch >= batches_per_epoch(len(job.pairs), tc.batch_size)
                if end_of_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                do_eval = (step == steps_total or (tc.eval_every_steps and step % tc.eval_every_steps == 0)
                           or (end_of_epoch and not tc.eval_every_steps))
                do_stop = step == steps_total or (tc.stop_after_steps and step >= tc.stop_after_steps)
                if do_eval:
                    evaluate_and_select(save_last)
                elif do_stop or stop.requested or (tc.save_every_steps and step % tc.save_every_steps == 0):
                    save_last()
                if do_stop or stop.requested:
                    halt = True
                    break
                if end_of_epoch:
                    break
            if halt:
                break
    finally:
        stop.restore()
        if lead and tb:
            tb.close()

    summary = {}
    if lead:
        wall = time.time() - started
        summary = {
            "run": job.meta.get("run"), "lang": job.meta.get("lang"), "steps": step, "steps_total": steps_total,
            "epochs_planned": n_epochs, "epoch": epoch, "finished": step >= steps_total,
            "stopped_early": step < steps_total,
            "resumed_from_step": resumed_from, "world_size": world, "device": str(device), "precision": precision,
            "train_rows": len(job.pairs), "train_items": len(job.items), "global_batch": tc.batch_size,
            "ablate": list(mc.ablate), "loss_terms": [k for k in PART_NAMES if k in last_logs and k not in ("loss", "tau")],
            "first_loss": first_loss, "last_loss": last_logs.get("loss"),
            "best_val_rsum": best["rsum"], "best_step": best["step"], "best_metrics": best["metrics"],
            "samples_per_s": samples / wall if wall > 0 else 0.0, "wall_s": wall,
            "checkpoint_last": str(last_path), "checkpoint_best": str(best_path) if best_path.is_file() else None,
            "log_jsonl": str(job.log_dir / "train.jsonl"), "tensorboard": tb is not None,
        }
        (job.log_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        log.write({"event": "end", "step": step, "finished": summary["finished"], "wall_s": wall})
        log.close()
    return summary
