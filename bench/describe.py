"""Benchmark of the describe stage against a plain `vllm.LLM.generate` script, and of media loading.

    .venv/bin/python bench/describe.py [--images 512] [--repeats 1] [--cases ...] [--eos-norm 0.6] [--skip-engine|--skip-load]
        [--routes stage,stage-tasks,stage-local] [--device-bound]

Engine part (issue 7's spec): per case, a baseline (one `LLM.generate` over all N requests, in a
fresh process, timed after engine start) and the stage (`describe.run()` in a fresh process,
steady rows/s after the first results), alternated. Cases: variable output length (tiny
Qwen2-VL whose EOS lm_head row is scaled, see --eos-norm) with 1 view and with the stage's 5
default views, and fixed 32 tokens (ignore_eos). Same pixels (`load_image`), prompts (the
stage's chat template), greedy, max_tokens 256, enforce_eager in both routes. `--device-bound`
runs the engine part in the shape of a GPU node: vLLM's model worker alone on one core, the
model given zero-output layers so that its forward passes are the bottleneck (bench/common.py
`pin_device_core`, `pad_layers`); its results go to their own section.

The second part times the CPU side alone, in this single process: `load_image` on the same
COCO-sized JPEGs (against a naive PIL decode + resize, to show what draft decoding saves) and
`load_video` on a 10 s and a 2 min 640x360 H.264 clip.

Results: a markdown table on stdout, the "describe" section of docs/benchmarks.md, and the raw
numbers in <out>/describe-results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages

# Settings every run here needs (see docs/benchmarks.md); set before vLLM or Ray is imported.
for _key, _value in {"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CACHE_ROOT": "/tmp/vllm-cache-bench"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.common import (DESCRIBE_ROUTE_LABELS, DESCRIBE_ROUTES, DEVICE_BOUND_HELP, Timeline,  # noqa: E402
                          engine_queue_cell, engine_queue_of, pad_layers, percentiles, pin_device_core,
                          round_order, steady_as_stage, tree_cpu_s, write_device_bound_section)
from pipelines.media import MediaConfig, load_image, load_video, target_size  # noqa: E402

PROMPT = "Describe this {media} in detail."
MAX_TOKENS = 256            # variable-length cases: greedy, EOS or 256 tokens
MAX_TOKENS_FIXED = 32       # the fixed-length case (ignore_eos)
MAX_MODEL_LEN = 1024        # both routes: the prompt is ~100 tokens
EOS_NORM = 0.6              # lm_head row norm of the EOS token (random init ~0.16): tuned for a wide spread
STAGE_MEDIA = MediaConfig(max_pixels=224 * 224)
COCO_SIZE = (640, 480)
VIDEO_SIZE = (640, 360)
VIDEO_FPS = 30
DOCS = ROOT / "docs" / "benchmarks.md"


def _cases() -> dict:
    from pipelines.describe import DEFAULT_VIEWS, View
    one = (View("detailed", PROMPT),)
    return {"variable-1view": {"views": one, "fixed": False, "label": "variable length, 1 view"},
            "variable-5views": {"views": DEFAULT_VIEWS, "fixed": False,
                                "label": f"variable length, {len(DEFAULT_VIEWS)} views (stage default)"},
            "fixed32-1view": {"views": one, "fixed": True, "label": f"fixed {MAX_TOKENS_FIXED} tokens (ignore_eos), 1 view"}}


ROUTE_LABELS = {"baseline": "one `LLM.generate`", **DESCRIBE_ROUTE_LABELS}
CASES: dict = {}  # filled by main(); not at import (vLLM's spawned processes re-import this file)


def parse_args() -> argparse.Namespace:
    CASES.update(_cases())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="number of JPEGs (>= 500 for the issue's numbers)")
    parser.add_argument("--repeats", type=int, default=1, help="baseline/stage pairs per case, alternated")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--eos-norm", type=float, default=EOS_NORM)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="bench data and results")
    parser.add_argument("--load-images", type=int, default=200, help="JPEGs timed in the load-rate part")
    parser.add_argument("--skip-engine", action="store_true", help="only the load-rate part")
    parser.add_argument("--skip-load", action="store_true", help="only the engine part (keeps the old load table)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--device-bound", action="store_true", help=DEVICE_BOUND_HELP + " (engine part only)")
    parser.add_argument("--label", default="", help="a note for this run (e.g. the commit measured)")
    parser.add_argument("--routes", default="stage,stage-local",
                        help="stage routes run after each baseline (bench/common.py DESCRIBE_ROUTES): stage "
                             "(Ray), stage-tasks (Ray, media loaded on Ray tasks), stage-engine (Ray, media "
                             "loaded in the engine actor), stage-local (executor local)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the stage's batch_size (items per dispatch); default: describe's own")
    parser.add_argument("--child", choices=("baseline", *DESCRIBE_ROUTES), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


# --------------------------------------------------------------------------- bench data

def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """COCO-sized JPEGs (640x480, quality 90, ~100 KB) with grain, gradients and shapes, so that
    their size and decode cost are near a photo's (flat synthetic images decode much faster).
    Image i depends on (seed, i) only: an interrupted run completes the same set."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(count)]
    width, height = COCO_SIZE
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for index, path in enumerate(paths):
        if path.exists():
            continue
        rng = np.random.default_rng([seed, index])
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-0.3, 0.3, 3), rng.uniform(-0.3, 0.3, 3)
        base = a + b * xx[..., None] + c * yy[..., None]
        grain = rng.normal(0, 20, (height // 2, width // 2, 3)).repeat(2, 0).repeat(2, 1)
        image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            box = (x0, y0, x0 + rng.uniform(20, 300), y0 + rng.uniform(20, 300))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        tmp = path.with_suffix(".tmp")
        image.save(tmp, format="JPEG", quality=90)
        tmp.rename(path)  # a killed run never leaves a half-written JPEG behind
    return paths


def make_videos(folder: Path) -> dict[str, Path]:
    """A 10 s and a 2 min 640x360 30 fps H.264 clip: a slow pan over a textured picture.
    The frames are strided views of one wide picture, so even 3,600 frames take no memory."""
    from pipelines.sample_data import make_video
    folder.mkdir(parents=True, exist_ok=True)
    width, height = VIDEO_SIZE
    videos = {}
    for name, seconds in (("10s", 10), ("2min", 120)):
        path = folder / f"pan-{name}-{width}x{height}.mp4"
        if not path.exists():
            frames_n = seconds * VIDEO_FPS
            panorama = np.asarray(make_panorama(width + frames_n, height))
            s0, s1, s2 = panorama.strides
            frames = np.lib.stride_tricks.as_strided(panorama, (frames_n, height, width, 3), (s1, s0, s1, s2),
                                                     writeable=False)
            tmp = path.with_name(f".{path.name}.tmp.mp4")
            make_video(tmp, frames, VIDEO_FPS)
            tmp.rename(path)
        videos[name] = path
    return videos


def make_panorama(width: int, height: int, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.normal(128, 40, (height // 8, width // 8, 3)).repeat(8, 0).repeat(8, 1)
    image = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).resize((width, height))
    draw = ImageDraw.Draw(image)
    for _ in range(width // 40):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + rng.uniform(10, 120), y0 + rng.uniform(10, 120)), fill=colour)
    return image


def build_model(out: Path, eos_norm: float | None = None, device_bound: bool = False) -> Path:
    """The tiny Qwen2-VL; with eos_norm, a copy whose lm_head row of the EOS token is scaled to
    that norm, so that greedy decoding stops at input-dependent steps (variable output length);
    device_bound: with zero-output layers added (bench/common.py `pad_layers`)."""
    from pipelines.tiny_models import build_tiny_qwen2_vl
    model = build_tiny_qwen2_vl(out / "tiny-qwen2-vl")
    if eos_norm is not None:
        model = scale_eos(model, out / f"tiny-qwen2-vl-eos{eos_norm:g}", eos_norm)
    return pad_layers(model) if device_bound else model


def scale_eos(base: Path, target: Path, eos_norm: float) -> Path:
    """A copy of the model folder `base` at `target` whose lm_head row of the EOS token has norm
    `eos_norm` (built once; reused when it exists)."""
    if (target / "model.safetensors").exists():
        return target
    import torch
    from safetensors.torch import load_file, save_file
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    eos = json.loads((base / "config.json").read_text())
    eos = eos.get("text_config", eos).get("eos_token_id")
    tensors = load_file(str(tmp / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("lm_head.weight"))
    row = tensors[key][eos].to(torch.float32)
    tensors[key][eos] = (row / row.norm() * eos_norm).to(tensors[key].dtype)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# --------------------------------------------------------------------------- the two routes (child processes)

def image_requests(model: Path, images: list[Path], prompts: list[str]) -> list[dict]:
    """vLLM requests for every image with every prompt (the model's chat template, the image
    before the text, as the stage sends them), an image's prompts next to each other."""
    import transformers

    from pipelines.engines.base import chat_content
    processor = transformers.AutoProcessor.from_pretrained(str(model))
    texts = [processor.apply_chat_template([{"role": "user", "content": chat_content(p, "image", 1, True)}],
                                           add_generation_prompt=True, tokenize=False) for p in prompts]
    pixels = [load_image(p, STAGE_MEDIA).pixels for p in images]
    return [{"prompt": t, "multi_modal_data": {"image": px}} for px in pixels for t in texts]


def run_baseline(model: Path, images: list[Path], prompts: list[str], fixed: bool) -> dict:
    """vLLM's own best: one `LLM.generate` over every request (each image with each prompt, an
    image's prompts next to each other, as the stage orders them), timed after engine start."""
    import vllm

    requests = image_requests(model, images, prompts)   # loaded before the clock starts
    t0 = time.perf_counter()
    # log stats on: each output then carries its engine-side finish time (metrics.last_token_ts)
    llm = vllm.LLM(model=str(model), enforce_eager=True, max_model_len=MAX_MODEL_LEN, disable_log_stats=False,
                   limit_mm_per_prompt={"image": 1, "video": 1}, seed=0)
    startup_s = time.perf_counter() - t0
    params = vllm.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS_FIXED if fixed else MAX_TOKENS,
                                 seed=0, repetition_penalty=1.0, ignore_eos=fixed)
    with Timeline() as timeline:
        t1 = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        generate_s = time.perf_counter() - t1
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    return {"route": "baseline", "startup_s": startup_s, "generate_s": generate_s, "rows": len(outputs),
            "rows_per_s": len(outputs) / generate_s, "finish_s": finish_times(outputs),
            "lengths": percentiles(lengths), **route_cpu(timeline.window(t1, t1 + generate_s), len(outputs))}


def route_cpu(window: dict, rows: int) -> dict:
    """The CPU window, plus the route's own CPU per output row in it: everything of ours but
    vLLM's engine processes (the baseline: vLLM's front end; the stage: vLLM's front end, our
    stage and Ray). On a small machine that CPU is taken from the engine."""
    outside = window.get("own_cpu_s", 0.0) - window.get("engine_cpu_s", 0.0)
    return window | {"route_cpu_ms_per_row": 1000 * outside / rows if rows > 0 else None}


def finish_times(outputs: list) -> list[float] | None:
    """Each request's engine-side finish time (vLLM's metrics.last_token_ts, log stats on),
    sorted, from the first one; None when this vLLM does not give them."""
    done = [getattr(getattr(o, "metrics", None), "last_token_ts", None) for o in outputs]
    if not all(done):
        return None
    return [t - min(done) for t in sorted(done)]


def run_stage(model: Path, image_dir: Path, workdir: Path, views: tuple, fixed: bool, n_images: int,
              route: str = "stage", batch_size: int | None = None) -> dict:
    """`describe.run` with the same model, pixels, prompts and sampling: steady rows/s after the
    first results (report.rows_per_s)."""
    import pyarrow.parquet as pq

    from pipelines import describe, store
    from pipelines.engines.base import EngineConfig, SamplingConfig
    from pipelines.ingest import IngestConfig

    shutil.rmtree(workdir, ignore_errors=True)
    engine = EngineConfig(engine="vllm", model=str(model), max_model_len=MAX_MODEL_LEN,
                          sampling=SamplingConfig(max_tokens=MAX_TOKENS_FIXED if fixed else MAX_TOKENS,
                                                  ignore_eos=fixed),
                          # log stats on, as in the baseline, which needs them for its finish times:
                          # they cost an LLM.generate 4-13% here (docs/benchmarks.md, sixth session)
                          engine_kwargs={"enforce_eager": True, "disable_log_stats": False})
    executor, load_on = DESCRIBE_ROUTES[route]
    cfg = describe.DescribeConfig(workdir=workdir, engine=engine, views=views, media=STAGE_MEDIA,
                                  ingest=IngestConfig(input=image_dir, workdir=workdir), progress=False,
                                  executor=executor, load_on=load_on,
                                  **({"batch_size": batch_size} if batch_size else {}))
    with Timeline() as timeline:   # others' CPU over the report's steady window (Ray's ended workers kept)
        t0 = time.perf_counter()
        report = describe.run(cfg)
    table = pq.read_table(workdir / store.DESCRIPTIONS_DIR)
    errors = [e for e in table.column("error_kind").to_pylist() if e]
    expected = n_images * len(views)
    if table.num_rows != expected or errors or report.error_rows:
        raise RuntimeError(f"stage output: {table.num_rows} rows (expected {expected}), {len(errors)} errors")
    lengths = table.column("output_tokens").to_pylist()
    return {"route": route, "startup_s": report.startup_s, "wall_s": report.wall_s, "rows": report.rows_written,
            "first_batch_rows": report.first_batch_rows, "rows_per_s": report.rows_per_s,
            "batch_size": cfg.batch_size, "lengths": percentiles(lengths),
            "engine_queue": engine_queue_of(report),
            **route_cpu(timeline.window(t0 + report.startup_s, t0 + report.last_rows_s),
                        report.rows_written - report.first_batch_rows)}


def child_main(args: argparse.Namespace) -> None:
    """One route of one case, in this fresh process; the result goes to args.child_out as JSON."""
    case = CASES[args.case]
    out = args.out.resolve()
    pinned = pin_device_core() if args.device_bound else {}   # first: vLLM and Ray inherit it
    model = build_model(out, None if case["fixed"] else args.eos_norm, args.device_bound)
    image_dir = out / f"images-{args.images}"
    if args.child == "baseline":
        prompts = [v.prompt_for("image") for v in case["views"]]
        result = run_baseline(model, sorted(image_dir.glob("*.jpg")), prompts, case["fixed"])
    else:
        result = run_stage(model, image_dir, out / "stage-workdir", case["views"], case["fixed"], args.images,
                           args.child, args.batch_size)
    result.update(case=args.case, **pinned)
    args.child_out.write_text(json.dumps(result) + "\n")


def run_child(args: argparse.Namespace, route: str, case: str) -> dict:
    import subprocess
    result_path = args.out.resolve() / f"child-{route}-{case}.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", route, "--case", case, "--images",
           str(args.images), "--out", str(args.out), "--eos-norm", str(args.eos_norm), "--child-out", str(result_path),
           *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
           *(["--device-bound"] if args.device_bound else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{route}/{case} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = time.perf_counter() - t0
    return result


def summarize(runs: list[dict]) -> dict:
    """Per case, each stage run against the baseline run of its round, and the medians:
    `ratios` like for like (the stage's steady rate against the baseline's counted the same
    way from its per-request finish times: rows after as many as the stage's first results,
    over the time from them to the last), `vs_generate` against the baseline's whole
    generate() (which includes its up-front input processing: flatters the stage)."""
    out = {}
    for case in CASES:
        base = [r for r in runs if r["case"] == case and r["route"] == "baseline"]
        for route in DESCRIBE_ROUTES:
            stage = [r for r in runs if r["case"] == case and r["route"] == route]
            like = [s["rows_per_s"] / (steady_as_stage(b.get("finish_s"), s["first_batch_rows"]) or float("nan"))
                    for b, s in zip(base, stage)]
            naive = [s["rows_per_s"] / b["rows_per_s"] for b, s in zip(base, stage)]
            if like:
                out[f"{case}/{route}"] = {"ratios": like, "median": statistics.median(like), "vs_generate": naive,
                                          "vs_generate_median": statistics.median(naive)}
    return out


# --------------------------------------------------------------------------- load rates

def naive_load(path: Path, cfg: MediaConfig) -> np.ndarray:
    """The obvious loader: full-size decode, then one BICUBIC resize to the same target size."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return np.asarray(rgb.resize(target_size(rgb.width, rgb.height, cfg), Image.Resampling.BICUBIC))


def rate(fn, items: list) -> tuple[float, float]:
    """(items per wall second, items per CPU second) for one pass. One process, one thread
    (the video decoder's helper process is counted in): items per CPU second is the rate per
    core, and it holds up when other users load the machine, which wall time does not."""
    cpu0, t0 = tree_cpu_s(), time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - t0), len(items) / (tree_cpu_s() - cpu0)


def median_rates(passes: list[tuple[float, float]]) -> dict:
    return {"per_wall_s": statistics.median(p[0] for p in passes),
            "per_cpu_s": statistics.median(p[1] for p in passes)}


def load_rates(images: list[Path], videos: dict[str, Path], rounds: int = 3) -> dict:
    with Timeline() as timeline:
        t0 = time.perf_counter()
        results = _load_rates(images, videos, rounds)
    results["foreign_cpu_share"] = timeline.window(t0, time.perf_counter())["foreign_cpu_share"]
    return results


def _load_rates(images: list[Path], videos: dict[str, Path], rounds: int) -> dict:
    results = {}
    for label, cfg in (("448x448", MediaConfig()), ("224x224", MediaConfig(max_pixels=224 * 224))):
        rate(lambda p: load_image(p, cfg), images[:10])  # warm the page cache and PIL's plugins
        media, naive = [], []
        for _ in range(rounds):  # alternate the two loaders pass by pass, so drift hits both
            media.append(rate(lambda p: load_image(p, cfg), images))
            naive.append(rate(lambda p: naive_load(p, cfg), images))
        out_h, out_w = load_image(images[0], cfg).pixels.shape[:2]
        results[f"jpeg_{label}"] = {"items": len(images), "output": f"{out_w}x{out_h}",
                                    "load_image": median_rates(media), "naive": median_rates(naive)}
    for name, path in videos.items():
        media = load_video(path, MediaConfig())  # also starts the decoder helper: not part of the rate
        passes = [rate(lambda p: load_video(p, MediaConfig()), [path] * 3) for _ in range(rounds)]
        results[f"video_{name}"] = {"frames_out": int(media.pixels.shape[0]),
                                    "output": f"{media.pixels.shape[2]}x{media.pixels.shape[1]}",
                                    "load_video": median_rates(passes)}
    return results


# --------------------------------------------------------------------------- report

def cold_import_s() -> float:
    """What a fresh plain script pays before LLM(): importing vllm (the runs here share one
    process, so their start-up excludes it; the stage's actor pays it inside startup_s)."""
    import subprocess
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vllm, transformers"], check=True, capture_output=True)
    return time.perf_counter() - t0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def markdown(results: dict) -> str:
    lines = []
    if results.get("runs"):
        lines += engine_table(results)
    if results.get("load_rates"):
        lines += load_table(results["load_rates"])
    return "\n".join(lines) + "\n"


def engine_table(results: dict) -> list[str]:
    summary = results["summary"]
    lines = [f"Machine: {results['machine']}; vllm {results['versions']['vllm']}, ray {results['versions']['ray']}; "
             f"code measured: {results.get('label') or '-'}. {results['images']} JPEGs 640x480 (q90) scaled to "
             f"<= 224*224 with `load_image`, tiny Qwen2-VL (random weights; variable cases: lm_head row of EOS "
             f"scaled to norm {results['eos_norm']:g}), greedy, max_tokens {MAX_TOKENS}, `enforce_eager` in both "
             f"routes, each run in a fresh process. Baseline: one `LLM.generate` over all requests, after engine "
             f"start; stage: `describe.run()` on a private local Ray (by default images load on the engine "
             f"actor; `--load-on tasks`: on Ray tasks) and with `executor=\"local\"`, steady "
             f"rows/s from its first results to its last "
             f"(`report.rows_per_s`). **stage/baseline is like for like**: the baseline's rate counted the "
             f"same way from vLLM's per-request finish times (rows after as many as the stage's first results, "
             f"over the time from them to the last; vLLM's log stats on in both routes: the baseline needs "
             f"them for its finish times, and they cost it 4-13%); in brackets the stage against "
             f"the baseline's whole generate() (rows/s column), which includes generate()'s up-front processing "
             f"of every input and so flatters the stage. CPU outside vLLM's engine: the route's CPU seconds "
             f"over the same window (the whole generate() for the baseline), less those of vLLM's EngineCore "
             f"and model worker, per row finished in it: vLLM's front end in both routes, plus our stage and "
             f"Ray in the stage. Model worker busy: the CPU of vLLM's model worker (the forward passes, bound "
             f"to its own core) per second of the same window, the engine's duty cycle. Requests in vLLM: "
             f"what the stage's engine held (queued or running) each time it handed back rows while more input "
             f"waited, 10th percentile / median (`report.engine_queue`; vLLM runs at most max_num_seqs, 256 "
             f"here, at once; the baseline hands it every request at once). "
             f"Command: `{results['command']}`.", "",
             "| case | run | route | requests | output tokens p10 / p50 / p90 / max (mean) | others' CPU share "
             "| CPU outside vLLM's engine (ms/row) | model worker busy | requests in vLLM p10 / p50 | engine start (s) "
             "| rows/s | stage/baseline (vs generate()) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pair: dict = {}
    for i, run in enumerate(results["runs"], 1):
        case = CASES[run["case"]]["label"]
        ln = run["lengths"]
        foreign, outside, worker = (run.get(k) for k in ("foreign_cpu_share", "route_cpu_ms_per_row",
                                                           "model_worker_cores"))
        held = engine_queue_cell(run)
        ratio = ""
        key = f"{run['case']}/{run['route']}"
        if run["route"] in DESCRIBE_ROUTES:
            k = pair.get(key, 0)
            ratio = f"**{summary[key]['ratios'][k]:.2f}** ({summary[key]['vs_generate'][k]:.2f})"
            pair[key] = k + 1
        lines.append(f"| {case} | {i} | {ROUTE_LABELS[run['route']]} | {run['rows']} | {ln['p10']:g} / {ln['p50']:g} / {ln['p90']:g} / "
                     f"{ln['max']} ({ln['mean']:.1f}) | {'-' if foreign is None else f'{foreign:.0%}'} | "
                     f"{'-' if outside is None else f'{outside:.2f}'} | {'-' if worker is None else f'{worker:.2f}'} | {held} | "
                     f"{run['startup_s']:.1f} | {run['rows_per_s']:.1f} | {ratio} |")
    lines += ["", "Median stage/baseline per case, like for like (target >= 0.95): " + "; ".join(
        f"{CASES[key.split('/')[0]]['label']}, {ROUTE_LABELS[key.split('/')[1]]}: **{v['median']:.2f}** "
        f"(vs generate() {v['vs_generate_median']:.2f})" for key, v in summary.items()) + ".", ""]
    return lines


def load_table(rates: dict) -> list[str]:
    lines = ["CPU load + preprocess, one process: items per CPU second (= per core), median of passes; "
             "per wall second in brackets (that one drops when other users load the machine; they took "
             f"{rates['foreign_cpu_share']:.0%} of it meanwhile):", "",
             "| input | output | `pipelines.media` | naive PIL (full decode + one resize) | media/naive |",
             "|---|---|---|---|---|"]
    for key in ("jpeg_448x448", "jpeg_224x224"):
        r = rates[key]
        media, naive = r["load_image"], r["naive"]
        lines.append(f"| JPEG 640x480 q90, max_pixels {key[5:].replace('x', '*')} | {r['output']} | "
                     f"{media['per_cpu_s']:.0f} ({media['per_wall_s']:.0f}) | "
                     f"{naive['per_cpu_s']:.0f} ({naive['per_wall_s']:.0f}) | "
                     f"{media['per_cpu_s'] / naive['per_cpu_s']:.2f} |")
    for key, label in (("video_10s", "10 s"), ("video_2min", "2 min")):
        r = rates[key]
        video = r["load_video"]
        lines.append(f"| H.264 640x360 30 fps {label}, {r['frames_out']} uniform frames (`load_video`, "
                     f"decoder helper process) | {r['frames_out']} x {r['output']} | "
                     f"{video['per_cpu_s']:.1f} ({video['per_wall_s']:.1f}) | - | - |")
    return lines + [""]


DOCS_HEADER = """# Benchmarks

Speed here is always a ratio against a baseline run side by side in the same script: absolute
times on shared machines are noise. Each section says which machine gave its numbers.

How to run (from the repository root):

- describe stage vs plain vLLM, and media load rates: `.venv/bin/python bench/describe.py`
  (`--images N`, `--repeats N`; data and raw JSON under `bench/out/`, which git ignores)
"""


def update_docs(section: str, engine: bool = True, load: bool = True) -> None:
    """Rewrite the generated part of the '## describe' section of docs/benchmarks.md (between
    its markers); with only one part measured, the other part's old text is kept."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else DOCS_HEADER
    begin, end = "<!-- bench/describe.py: begin -->", "<!-- bench/describe.py: end -->"
    load_mark = "CPU load + preprocess, one process"
    if begin in text and end in text:
        old = text[text.index(begin):text.index(end)]
        old_load = old[old.index(load_mark):] if load_mark in old else ""
        old_engine = old[old.index("\n\n") + 2:old.index(load_mark)] if load_mark in old else ""
        if not load:
            section = section + "\n" + old_load
        elif not engine:
            section = old_engine + section
    block = f"{begin}\n_Written by `bench/describe.py`; notes below are by hand._\n\n{section}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n## describe\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text, encoding="utf-8")


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    import ray
    import vllm

    out = args.out.resolve()
    image_dir = out / f"images-{args.images}"  # the stage ingests the whole folder: exactly N images
    images = make_images(image_dir, args.images)
    results: dict = {"machine": machine(), "versions": {"vllm": vllm.__version__, "ray": ray.__version__},
                     "command": " ".join(["bench/describe.py", *sys.argv[1:]]), "images": args.images,
                     "eos_norm": args.eos_norm, "label": args.label, "device_bound": args.device_bound, "runs": []}
    if not args.skip_engine:
        build_model(out, None, args.device_bound), build_model(out, args.eos_norm, args.device_bound)
        for case in args.cases.split(","):
            for repeat in range(args.repeats):
                for route in round_order(["baseline", *args.routes.split(",")], repeat + 1):
                    run = run_child(args, route, case)
                    ln = run["lengths"]
                    print(f"[{case} {repeat + 1}/{args.repeats}] {route}: {run['rows']} rows, {run['rows_per_s']:.1f} "
                          f"rows/s, lengths p10/p50/p90/max {ln['p10']}/{ln['p50']}/{ln['p90']}/{ln['max']}, "
                          f"others' CPU {run.get('foreign_cpu_share') or 0:.0%}", flush=True)
                    results["runs"].append(run)
                    (out / "describe-results.json").write_text(json.dumps(results, indent=2) + "\n")
        results["summary"] = summarize(results["runs"])
    if not args.skip_load and not args.device_bound:
        results["load_rates"] = load_rates(images[:args.load_images], make_videos(out / "videos"))
    (out / "describe-results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if args.no_docs:
        return
    if args.device_bound:
        write_device_bound_section("describe.py", "describe", table)
    else:
        update_docs(table, engine=bool(results["runs"]), load=bool(results.get("load_rates")))


if __name__ == "__main__":  # vLLM starts its engine process with spawn: it re-imports this file
    main()
