"""Training throughput and peak memory of the LECCR model + losses, optimised vs a plain baseline.

    .venv/bin/python bench/train.py                      # whatever device is present
    .venv/bin/python bench/train.py --device cpu --tiny   # seconds: a smoke test of every code path
    bash bench/train_gpu.sh                               # the paper's dimensions on one CUDA GPU

Random weights built from configs (no downloads): CLIP ViT-B/32 vision tower at 384 px (145
visual tokens, projection 512), multilingual BERT (768-d, 12 layers, vocab 119,547), K = 4
slots over 3 layers, embedding 256, descriptions of 200 tokens, captions of 32, batch 128 on a
GPU. On a CPU the encoders get fewer layers and the batch is smaller (printed and stored with
the results); `--tiny` shrinks everything. One training step = forward (image tower, captions
src + tgt, descriptions or their cached features, slots), `leccr_core.losses.total_loss`,
backward and an AdamW step.

Variants, each measured in its own fresh subprocess so that peak memory never mixes:
- baseline     fp32, descriptions encoded by BERT (no-grad) every step, eager
- cache        fp32, description token features precomputed once per item, copied in per step
- bf16         bf16 autocast, no cache
- bf16+cache   bf16 autocast + cached description features
- bf16+cache+compile   the same under torch.compile (CUDA default; opt-in on CPU)
The optimised variant reported against the baseline is the fastest variant without the cache
(the same computation as the baseline); the fastest cache variant is reported apart, as an
approximation.

Caveat for the cache: the method encodes descriptions with the *shared, fine-tuned* BERT under
no-grad, so their features drift as BERT trains. Cached features come from the BERT of the time
of caching (pretrained weights, or refreshed every N steps): exact only with a frozen
description encoder; otherwise an approximation whose effect on retrieval must be checked.

Metrics: samples/s over the timed steps (warm-up steps excluded; CUDA synchronised);
peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS (VmHWM) on CPU.
Results: a table on stdout, raw JSON in bench/out/ (and --json-out), and the "train" section of
docs/benchmarks.md (not for --tiny). This script imports only torch, transformers and
leccr_core (the GPU machine has no ray / vllm / decord).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
DOCS = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(ROOT))   # leccr_core from this checkout, installed or not
from bench.docs_section import replace_section  # noqa: E402

# The paper's dimensions (docs: leccr-method.md).
PAPER = dict(clip_layers=12, clip_width=768, clip_heads=12, clip_mlp=3072, patch=32, image=384, proj=512,
             bert_layers=12, bert_width=768, bert_heads=12, bert_mlp=3072, vocab=119547,
             slots=4, slot_layers=3, embed=256, desc_len=200, cap_len=32, batch=128)
# CPU: the same widths, vocab and sequence lengths; fewer encoder layers and a small batch.
CPU_REDUCED = dict(PAPER, clip_layers=2, bert_layers=2, batch=8)
TINY = dict(clip_layers=1, clip_width=64, clip_heads=4, clip_mlp=128, patch=32, image=64, proj=32,
            bert_layers=1, bert_width=64, bert_heads=4, bert_mlp=128, vocab=1000,
            slots=4, slot_layers=3, embed=16, desc_len=40, cap_len=12, batch=4)

VARIANTS = {
    "baseline": dict(amp=False, cache=False, compile=False),
    "cache": dict(amp=False, cache=True, compile=False),
    "bf16": dict(amp=True, cache=False, compile=False),
    "bf16+cache": dict(amp=True, cache=True, compile=False),
    "bf16+cache+compile": dict(amp=True, cache=True, compile=True),
}
DOCS_HEADER = ("# Benchmarks\n\nSpeed here is always a ratio against a baseline run side by side in the same "
               "script: absolute times on shared machines are noise. Each section says which machine gave its "
               "numbers.\n")


# ----------------------------------------------------------------------------- worker


def _vm_status(key: str) -> float | None:
    """VmHWM / VmRSS of this process in MiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


def clip_native_size(dims: dict) -> int:
    """CLIP's own input size for these dims (224 for 384 px, patch 32): LeccrModel then resizes
    the position table to dims["image"], as it does for a pretrained checkpoint."""
    p = dims["patch"]
    return max(p, (dims["image"] * 224 // 384) // p * p)


def build(dims: dict, device):
    import torch
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from leccr_core.config import LeccrConfig
    from leccr_core.model import LeccrModel

    cfg = LeccrConfig(media="image", d=dims["proj"], text_width=dims["bert_width"], embed_dim=dims["embed"],
                      image_size=dims["image"], desc_max_tokens=dims["desc_len"], n_slots=dims["slots"],
                      n_slot_layers=dims["slot_layers"])
    with torch.device(device):
        # CLIP's own 224 px table, resized to the config's image size by LeccrModel (as when loading)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=dims["clip_width"], intermediate_size=dims["clip_mlp"], num_hidden_layers=dims["clip_layers"],
            num_attention_heads=dims["clip_heads"], image_size=clip_native_size(dims),
            patch_size=dims["patch"], projection_dim=dims["proj"]))
        text = BertModel(BertConfig(
            vocab_size=dims["vocab"], hidden_size=dims["bert_width"], num_hidden_layers=dims["bert_layers"],
            num_attention_heads=dims["bert_heads"], intermediate_size=dims["bert_mlp"], max_position_embeddings=512))
        model = LeccrModel(cfg, vision, text)
    return cfg, model


def batch_inputs(dims: dict, device, seed: int = 0) -> dict:
    """Random pixels and token ids with padding (descriptions 50-100% of the max length)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    B = dims["batch"]

    def tokens(L, lo):
        ids = torch.randint(1000 if dims["vocab"] > 2000 else 5, dims["vocab"], (B, L), generator=g)
        lengths = torch.randint(lo, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
        ids[:, 0] = 101 if dims["vocab"] > 2000 else 2            # [CLS]
        return (ids * mask).to(device), mask.to(device)

    desc_ids, desc_mask = tokens(dims["desc_len"], dims["desc_len"] // 2)
    src_ids, src_mask = tokens(dims["cap_len"], dims["cap_len"] // 4)
    tgt_ids, tgt_mask = tokens(dims["cap_len"], dims["cap_len"] // 4)
    pixels = torch.randn(B, 3, dims["image"], dims["image"], generator=g).to(device)
    return dict(visual=pixels, desc_ids=desc_ids, desc_mask=desc_mask, src_ids=src_ids, src_mask=src_mask,
                tgt_ids=tgt_ids, tgt_mask=tgt_mask, ids=torch.arange(B, device=device))


def worker(spec: dict) -> dict:
    """One variant in this (fresh) process: build, warm up, time, measure peak memory."""
    import torch

    from leccr_core.losses import total_loss

    device = torch.device(spec["device"])
    variant = VARIANTS[spec["variant"]]
    dims = spec["dims"]
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg, model = build(dims, device)
    model.train()
    # no weight decay on biases and norms (the method's optimiser); lr values do not matter here
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-5, betas=(0.9, 0.98), eps=1e-8)
    data = batch_inputs(dims, device)
    amp_dtype = torch.bfloat16 if variant["amp"] else None

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp_dtype else contextlib.nullcontext()

    cache = None
    if variant["cache"]:
        # Computed once per item, as an offline cache would be (then read from host memory each
        # step): the description encoder's no-grad output, stored in the compute dtype.
        with torch.no_grad(), autocast():
            feats = model.encode_descriptions(data["desc_ids"], data["desc_mask"])
        store_dtype = torch.bfloat16 if amp_dtype else torch.float32
        cache = feats.to("cpu", store_dtype)
        if cuda:
            cache = cache.pin_memory()
        del feats

    def step_fn(desc_feats):
        with autocast():
            out = model(data["visual"], desc_ids=None if desc_feats is not None else data["desc_ids"],
                        desc_mask=data["desc_mask"], src_ids=data["src_ids"], src_mask=data["src_mask"],
                        tgt_ids=data["tgt_ids"], tgt_mask=data["tgt_mask"], desc_feats=desc_feats)
        # the losses in fp32 (outside autocast): bf16 logits / tau would lose ~2 digits, and the
        # loss is a tiny share of the step
        out = dataclasses.replace(out, **{f.name: getattr(out, f.name).float() for f in dataclasses.fields(out)
                                          if torch.is_tensor(getattr(out, f.name))
                                          and getattr(out, f.name).is_floating_point()})
        loss, _ = total_loss(out, data["ids"], cfg)
        return loss

    forward_loss = torch.compile(step_fn) if variant["compile"] else step_fn

    def train_step():
        desc_feats = cache.to(device, non_blocking=True) if cache is not None else None
        loss = forward_loss(desc_feats)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before = _vm_status("VmRSS")
    t0 = time.perf_counter()
    losses = []
    for _ in range(spec["warmup"]):
        losses.append(float(train_step()))
    sync()
    warmup_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(spec["steps"]):
        t, c = time.perf_counter(), time.process_time()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
        losses.append(float(loss))
    total = sum(times)
    threads = torch.get_num_threads()
    result = {
        "variant": spec["variant"], **variant, "device": str(device), "batch": dims["batch"],
        "warmup_steps": spec["warmup"], "steps": spec["steps"], "warmup_s": round(warmup_s, 3),
        "step_s_median": round(sorted(times)[len(times) // 2], 4), "step_s_all": [round(t, 4) for t in times],
        "samples_per_s": round(dims["batch"] * spec["steps"] / total, 3),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "threads": threads,
        # CPU time this process got over the timed steps per thread-second of wall time: well
        # below 1 on CPU means other processes shared the cores (timings are then noisier)
        "own_cpu_share": round(sum(cpu_times) / (total * threads), 3),
        # on CPU, work per sample in CPU seconds: much less sensitive to other processes than
        # wall time (on CUDA it only counts the host thread, so it is not used there)
        "samples_per_cpu_s": round(dims["batch"] * spec["steps"] / max(sum(cpu_times), 1e-9), 3),
    }
    if cuda:
        result["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        result["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
        result["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)   # PyTorch's default: off
    else:
        result["peak_mem_mib"] = round(_vm_status("VmHWM"), 1)
        result["rss_before_train_mib"] = round(rss_before, 1) if rss_before else None
        # what training adds to the built model and inputs: grads, AdamW state (lazy), activations
        result["train_increment_mib"] = round(result["peak_mem_mib"] - rss_before, 1) if rss_before else None
        result["peak_mem_kind"] = "process peak RSS (VmHWM)"
    return result


# ----------------------------------------------------------------------------- driver


def device_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def run_variant(name: str, args, dims: dict, device: str) -> dict:
    spec = {"variant": name, "device": device, "dims": dims, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    limit = (args.compile_timeout or args.variant_timeout) if VARIANTS[name]["compile"] else args.variant_timeout
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"variant": name, **VARIANTS[name], "error": f"timed out after {limit:.0f} s"}
    wall = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": name, **VARIANTS[name], "error": f"exit {proc.returncode}: {' | '.join(tail)}",
                "process_wall_s": wall}
    return {**json.loads(lines[-1]), "process_wall_s": wall}


def combine(rs: list[dict]) -> dict:
    """One variant over its rounds: median samples/s (its run's other fields), max peak memory."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[-1]
    ok.sort(key=lambda r: r["samples_per_s"])
    mid = dict(ok[len(ok) // 2])
    mid["rounds"] = len(rs)
    mid["samples_per_s_all"] = [r["samples_per_s"] for r in ok]
    cpu_rates = sorted(r["samples_per_cpu_s"] for r in ok)
    mid["samples_per_cpu_s"] = cpu_rates[len(cpu_rates) // 2]
    mid["samples_per_cpu_s_all"] = [r["samples_per_cpu_s"] for r in ok]
    mid["peak_mem_mib"] = max(r["peak_mem_mib"] for r in ok)
    if all(r.get("train_increment_mib") is not None for r in ok):
        mid["train_increment_mib"] = max(r["train_increment_mib"] for r in ok)
    mid["failed_rounds"] = [r["error"] for r in rs if "error" in r]
    return mid


def summarise(results: list[dict]) -> dict:
    """The optimised variant = the fastest variant that computes the method exactly (no
    description cache): by samples/s on CUDA, by samples per CPU-second on CPU (wall time on
    a shared CPU mostly measures the neighbours). The fastest cached variant is reported apart,
    as an approximation: its description features come from a frozen BERT, not the fine-tuned one."""
    ok = {r["variant"]: r for r in results if "error" not in r}
    base = ok.get("baseline")
    exact = [r for r in ok.values() if not r["cache"] and r["variant"] != "baseline"]
    cached = [r for r in ok.values() if r["cache"]]
    if base is None or not (exact or cached):
        return {}
    cpu = not str(base.get("device", "")).startswith("cuda")
    for r in ok.values():
        r["speedup_vs_baseline"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
        r["cpu_time_speedup_vs_baseline"] = round(r["samples_per_cpu_s"] / base["samples_per_cpu_s"], 3)
        r["peak_mem_vs_baseline"] = round(r["peak_mem_mib"] / base["peak_mem_mib"], 3)
    key = (lambda r: r["samples_per_cpu_s"]) if cpu else (lambda r: r["samples_per_s"])

    def entry(best: dict) -> dict:
        e = {"variant": best["variant"], "speedup": best["speedup_vs_baseline"],
             "peak_mem_ratio": best["peak_mem_vs_baseline"]}
        if cpu:
            e["cpu_time_speedup"] = best["cpu_time_speedup_vs_baseline"]
            if best.get("train_increment_mib") and base.get("train_increment_mib"):
                e["train_increment_ratio"] = round(best["train_increment_mib"] / base["train_increment_mib"], 3)
        return e

    out: dict = {"chosen_by": "samples per CPU-second" if cpu else "samples/s"}
    if exact:
        out["optimised"] = entry(max(exact, key=key))
    if cached:
        out["approximation"] = entry(max(cached, key=key))
    return out


def table(payload: dict) -> str:
    cpu = payload["device"] == "cpu"
    head = ["variant", "bf16 autocast", "desc cache", "compile", "samples/s", "vs baseline"]
    if cpu:
        head += ["samples per CPU-s", "vs baseline", "own CPU share"]
    head += ["peak memory (MiB)", "vs baseline"]
    if cpu:
        head += ["added by training (MiB)"]
    head += ["median step (s)", "loss first -> last"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    for r in payload["results"]:
        cells = [r["variant"], yes(r["amp"]), yes(r["cache"]), yes(r["compile"])]
        if "error" in r:
            cells.append(f"failed: {r['error'][:120]}")
            cells += [""] * (len(head) - len(cells))
        else:
            cells += [f"{r['samples_per_s']:.3g}", f"{r.get('speedup_vs_baseline', 0):.2f}"]
            if cpu:
                cells += [f"{r['samples_per_cpu_s']:.3g}", f"{r.get('cpu_time_speedup_vs_baseline', 0):.2f}",
                          f"{r['own_cpu_share']:.2f}"]
            cells += [f"{r['peak_mem_mib']:.0f}", f"{r.get('peak_mem_vs_baseline', 0):.2f}"]
            if cpu:
                inc = r.get("train_increment_mib")
                cells.append("" if inc is None else f"{inc:.0f}")
            cells += [f"{r['step_s_median']:.3f}", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def describe_setup(payload: dict) -> str:
    d = payload["dims"]
    partial = "" if payload.get("complete", True) else "**Incomplete run** (stopped early; variants below only). "
    return partial + (f"Device: **{payload['device_name']}** ({payload['device']}); torch {payload['torch']}, transformers "
            f"{payload['transformers']}. Sizes ({payload['size_label']}): CLIP ViT-B/32-style tower "
            f"{d['clip_layers']} layers x {d['clip_width']} at {d['image']} px "
            f"({(d['image'] // d['patch']) ** 2 + 1} tokens x {d['proj']}), BERT {d['bert_layers']} layers x "
            f"{d['bert_width']} (vocab {d['vocab']}), K = {d['slots']} slots / {d['slot_layers']} layers, embed "
            f"{d['embed']}, descriptions {d['desc_len']} tokens, captions {d['cap_len']}, batch {d['batch']}. "
            f"{payload['warmup']} warm-up + {payload['steps']} timed steps per variant, each variant in a fresh "
            f"process, {payload.get('repeats', 1)} interleaved round(s) (median samples/s, max peak); "
            f"torch threads: {payload.get('threads') or 'default'}; "
            f"peak memory = {payload['peak_mem_kind']}. Command: `{payload['command']}`.")


def _ratios(e: dict) -> str:
    line = f"{e['speedup']:.2f}x samples/s"
    if "cpu_time_speedup" in e:
        line += f", {e['cpu_time_speedup']:.2f}x samples per CPU-second"
    line += f"; {e['peak_mem_ratio']:.2f}x peak memory"
    if "train_increment_ratio" in e:
        line += f" ({e['train_increment_ratio']:.2f}x the memory training adds to the built model)"
    return line


def summary_line(s: dict) -> str:
    if isinstance(s.get("optimised"), str):     # results written before: the pick was a cache variant
        legacy = {k: s[k] for k in ("speedup", "peak_mem_ratio", "cpu_time_speedup", "train_increment_ratio") if k in s}
        s = {"chosen_by": s.get("chosen_by"), "approximation": {"variant": s["optimised"], **legacy}}
    lines = []
    if "optimised" in s:
        o = s["optimised"]
        if o.get("cpu_time_speedup", o["speedup"]) <= 1.0:
            lines.append(f"**No variant computing the same as the baseline beat it** (fastest: {o['variant']}, "
                         f"{_ratios(o)}).")
        else:
            lines.append(f"**Optimised, same computation ({o['variant']}, chosen by {s.get('chosen_by', 'samples/s')}) vs "
                         f"baseline (fp32, no cache, eager): {_ratios(o)}.**")
    if "approximation" in s:
        a = s["approximation"]
        lines.append(f"Approximation, not the method ({a['variant']}: description features from the frozen "
                     f"pretrained BERT, `--cache-desc-features`) vs baseline: {_ratios(a)}.")
    return "\n\n".join(lines)


def render_section(payloads: list[dict]) -> str:
    parts = []
    by_device = {p["device"]: p for p in payloads}
    for device in ("cuda", "cpu"):
        p = by_device.get(device)
        title = "GPU (the paper's dimensions)" if device == "cuda" else "CPU (reduced sizes)"
        parts.append(f"### {title}\n")
        if p is None:
            parts.append("**Pending**: not run yet on a CUDA machine (no GPU was available to the session that "
                         "wrote this). Run `bash bench/train_gpu.sh` on one, then "
                         "`.venv/bin/python bench/train.py --render bench/out/train-results-cuda.json`.\n"
                         if device == "cuda" else "Not run yet: `.venv/bin/python bench/train.py --device cpu`.\n")
            continue
        parts.append(describe_setup(p) + "\n")
        parts.append(table(p) + "\n")
        s = p.get("summary") or {}
        if s:
            parts.append(summary_line(s) + "\n")
        if device == "cpu":
            parts.append("On CPU the peak RSS includes the Python + torch + transformers runtime and the model "
                         "with its AdamW state, which every variant shares, so memory ratios are diluted.\n")
    parts.append("How to run: `.venv/bin/python bench/train.py` (device found automatically; `--device cpu --tiny` "
                 "for a seconds-long smoke test; `--variants` to pick; raw JSON in `bench/out/train-results-*.json`), "
                 "`bash bench/train_gpu.sh` on a CUDA machine (writes the JSON to `$OUT` when set).\n")
    parts.append("The cached variants are an approximation, never the optimised default: they feed description "
                 "features computed once by the frozen pretrained BERT, while the method encodes descriptions with "
                 "the shared BERT that captions fine-tune (there is no refresh). Use them only after checking "
                 "retrieval quality on the task.\n")
    return "\n".join(parts)


def update_docs(section: str) -> None:
    """Rewrite the '## train' section of docs/benchmarks.md, keeping every other section."""
    replace_section("train.py", f"## train\n\n_Written by `bench/train.py`._\n\n{section}", header=DOCS_HEADER)


def docs_payloads(extra: list[Path]) -> list[dict]:
    """The newest full-size result per device: bench/out/train-results-{cpu,cuda}.json + extra files."""
    found = {}
    for path in [OUT_DIR / "train-results-cpu.json", OUT_DIR / "train-results-cuda.json", *extra]:
        if path.is_file():
            p = json.loads(path.read_text(encoding="utf-8"))
            if not p.get("tiny"):
                found[p["device"]] = p
    return list(found.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every code path")
    ap.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} "
                                                     "(default: all but compile on CPU, all on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 CUDA, 1 CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--clip-layers", type=int, default=None)
    ap.add_argument("--bert-layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: 1 on CPU, where a shared 2-core machine makes "
                         "OpenMP barriers stall; torch's default on CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds over all variants, interleaved; the "
                                                              "median is reported (default 2 CPU, 1 CUDA)")
    ap.add_argument("--variant-timeout", type=float, default=900, help="seconds per variant process")
    ap.add_argument("--compile-timeout", type=float, default=None,
                    help="seconds for a torch.compile variant's process (default: --variant-timeout)")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the raw JSON here")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--render", type=Path, nargs="*", default=None,
                    help="only rewrite the docs section from result JSON files (plus bench/out's)")
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.render is not None:
        update_docs(render_section(docs_payloads(args.render)))
        print(f"rewrote the train section of {DOCS}")
        return

    import torch
    import transformers
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    if args.tiny:
        dims, label = dict(TINY), "tiny (smoke test)"
    elif device == "cuda":
        dims, label = dict(PAPER), "the paper's"
    else:
        dims, label = dict(CPU_REDUCED), "reduced for CPU: fewer encoder layers, smaller batch"
    for key in ("batch", "clip_layers", "bert_layers"):
        if getattr(args, key) is not None:
            dims[key] = getattr(args, key)
            label += f", {key}={dims[key]} by flag"
    cpu = device == "cpu"
    args.steps = args.steps or (3 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.repeats = args.repeats or (2 if cpu else 1)
    if cpu and args.threads is None:
        args.threads = 1
    names = (args.variants.split(",") if args.variants else
             [v for v in VARIANTS if not (cpu and "compile" in v)])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")

    payload = {"bench": "train", "device": device, "device_name": device_name(device), "tiny": args.tiny,
               "size_label": label, "dims": dims, "steps": args.steps, "warmup": args.warmup,
               "repeats": args.repeats, "threads": args.threads,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "peak_mem_kind": ("torch.cuda.max_memory_allocated" if device == "cuda"
                                 else "process peak RSS (VmHWM), fresh process per variant"),
               "command": "bench/train.py " + " ".join(sys.argv[1:]),
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"train-results-{device}{'-tiny' if args.tiny else ''}.json"

    def save() -> None:
        # after every variant: a run killed by an outer timeout still leaves what it measured
        text = json.dumps(payload, indent=2)
        for path in (out, args.json_out):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):              # interleaved: A B C A B C, so drift hits all alike
        for name in names:
            print(f"[train bench] {name} (round {rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            r = run_variant(name, args, dims, device)
            print(f"[train bench] {name}: " + (r.get("error") or f"{r['samples_per_s']:.2f} samples/s, "
                                               f"peak {r['peak_mem_mib']:.0f} MiB, own CPU share "
                                               f"{r['own_cpu_share']:.2f}"), file=sys.stderr, flush=True)
            runs[name].append(r)
            payload["results"] = [combine(rs) for rs in runs.values() if rs]
            payload["summary"] = summarise(payload["results"])
            save()
    payload["complete"] = True
    results = payload["results"]
    save()
    print(describe_setup(payload))
    print(table(payload))
    if payload["summary"]:
        print(summary_line(payload["summary"]))
    if not args.tiny and not args.no_docs:
        update_docs(render_section(docs_payloads([])))
    failed = [r["variant"] for r in results if "error" in r]
    if "baseline" in failed or len(failed) == len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
