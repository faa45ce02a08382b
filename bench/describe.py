"""Benchmark of the describe stage against a plain `vllm.LLM.generate` script, and of media loading.

    .venv/bin/python bench/describe.py [--images 512] [--repeats 2] [--out bench/out]

One run, one machine, the same N JPEGs, the same tiny Qwen2-VL and the same sampling (greedy,
a fixed 32 output tokens): the plain script and the stage alternate (plain, stage, plain,
stage, ...) so that drift on a shared machine hits both alike. Speed is reported as ratios of
runs side by side; absolute numbers are only context. Start-up (engine construction, Ray,
the first batch) is reported apart from the steady throughput measured after the first batch.

The second part times the CPU side alone, in this single process: `load_image` on the same
COCO-sized JPEGs (against a naive PIL decode + resize, to show what draft decoding saves) and
`load_video` on a 10 s and a 2 min 640x360 H.264 clip.

Results: a markdown table on stdout, the "describe" section of docs/benchmarks.md, and the raw
numbers in <out>/describe-results.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages

# Settings every run here needs (see docs/benchmarks.md); set before vLLM or Ray is imported.
for _key, _value in {"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CACHE_ROOT": "/tmp/vllm-cache-bench"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from pipelines.media import MediaConfig, load_image, load_video, target_size  # noqa: E402

PROMPT = "Describe this {media} in detail."
MAX_TOKENS = 32
MAX_MODEL_LEN = 1024        # both routes: the prompt is ~100 tokens, the output 32
BATCH = 64                  # requests per engine call, in both routes
STAGE_MEDIA = MediaConfig(max_pixels=224 * 224)
COCO_SIZE = (640, 480)
VIDEO_SIZE = (640, 360)
VIDEO_FPS = 30
DOCS = ROOT / "docs" / "benchmarks.md"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="number of JPEGs (>= 500 for the issue's numbers)")
    parser.add_argument("--repeats", type=int, default=2, help="plain/stage pairs, alternated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="bench data and results")
    parser.add_argument("--load-images", type=int, default=200, help="JPEGs timed in the load-rate part")
    parser.add_argument("--skip-engine", action="store_true", help="only the load-rate part")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser.parse_args()


# --------------------------------------------------------------------------- bench data

def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """COCO-sized JPEGs (640x480, quality 90) with texture, gradients and shapes, so that their
    size and decode cost are near a photo's (flat synthetic images decode much faster)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(count)]
    rng = np.random.default_rng(seed)
    width, height = COCO_SIZE
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for path in paths:
        if path.exists():
            continue
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-0.3, 0.3, 3), rng.uniform(-0.3, 0.3, 3)
        base = a + b * xx[..., None] + c * yy[..., None]
        noise = rng.normal(0, 18, (height // 4, width // 4, 3)).repeat(4, 0).repeat(4, 1)  # coarse grain
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
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


def build_model(out: Path) -> Path:
    from pipelines.tiny_models import build_tiny_qwen2_vl
    return build_tiny_qwen2_vl(out / "tiny-qwen2-vl")


# --------------------------------------------------------------------------- the plain script

def run_plain(model: Path, images: list[Path]) -> dict:
    """What a user would write without the pipeline: one in-process LLM, then batches of
    BATCH images loaded with the stage's own loader and generated one batch at a time."""
    import transformers
    import vllm

    from pipelines.engines.base import chat_content

    t0 = time.perf_counter()
    processor = transformers.AutoProcessor.from_pretrained(str(model))
    llm = vllm.LLM(model=str(model), enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                   limit_mm_per_prompt={"image": 1, "video": 1}, seed=0)
    startup_s = time.perf_counter() - t0
    # the same request the stage sends: its chat template, its SamplingParams fields
    content = chat_content(PROMPT.format(media="image"), "image", 1, native_video=True)
    prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True, tokenize=False)
    params = vllm.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=0,
                                 repetition_penalty=1.0, ignore_eos=True)
    arrivals, output_tokens = [], 0
    for start in range(0, len(images), BATCH):
        batch = [{"prompt": prompt, "multi_modal_data": {"image": load_image(p, STAGE_MEDIA).pixels}}
                 for p in images[start:start + BATCH]]
        outputs = llm.generate(batch, params, use_tqdm=False)
        output_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        arrivals.append((time.perf_counter() - t0, len(outputs)))
    wall_s = time.perf_counter() - t0
    shut_down(llm)
    return {"route": "plain", "startup_s": startup_s, "wall_s": wall_s, "rows": len(images),
            "output_tokens": output_tokens, **steady(arrivals)}


def shut_down(llm) -> None:
    """Stop the engine core process now, so the stage that runs next has both cores."""
    import psutil
    children = psutil.Process().children(recursive=True)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    _, alive = psutil.wait_procs(children, timeout=30)
    if alive:
        raise RuntimeError(f"vLLM engine processes still running after shutdown: {[p.pid for p in alive]}")


def steady(arrivals: list[tuple[float, int]]) -> dict:
    """Time to the first batch, and rows/s over the batches after it (start-up excluded)."""
    first_s, first_rows = arrivals[0]
    last_s = arrivals[-1][0]
    rows_after = sum(n for _, n in arrivals[1:])
    return {"first_batch_s": first_s, "first_batch_rows": first_rows, "last_batch_s": last_s,
            "arrivals": [[round(t, 3), n] for t, n in arrivals],
            "steady_rows_per_s": rows_after / (last_s - first_s) if rows_after else float("nan")}


# --------------------------------------------------------------------------- the stage

@contextmanager
def record_arrivals(arrivals: list[tuple[float, int]], t0: float):
    """Hook the stage's progress callback: it is called once per batch that reaches the driver,
    so the times show whether results stream in while the engine works."""
    from pipelines import describe

    original = describe._progress

    @contextmanager
    def progress(enabled, total):
        yield lambda n: arrivals.append((time.perf_counter() - t0, n)) if n else None

    describe._progress = progress
    try:
        yield
    finally:
        describe._progress = original


def run_stage(model: Path, image_dir: Path, workdir: Path, n_images: int) -> dict:
    import ray

    from pipelines import describe
    from pipelines.engines.base import EngineConfig, SamplingConfig
    from pipelines.ingest import IngestConfig

    shutil.rmtree(workdir, ignore_errors=True)
    engine = EngineConfig(engine="vllm", model=str(model), max_model_len=MAX_MODEL_LEN,
                          sampling=SamplingConfig(max_tokens=MAX_TOKENS, ignore_eos=True),
                          engine_kwargs={"enforce_eager": True})
    cfg = describe.DescribeConfig(workdir=workdir, engine=engine, views=(describe.View("detailed", PROMPT),),
                                  media=STAGE_MEDIA, ingest=IngestConfig(input=image_dir, workdir=workdir),
                                  batch_size=BATCH, progress=False)
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with record_arrivals(arrivals, t0):
        report = describe.run(cfg)
    ray.shutdown()  # the next plain run gets the machine without Ray's processes
    check_stage_output(workdir, n_images, report)
    return {"route": "stage", "startup_s": report.startup_s, "wall_s": report.wall_s, "rows": report.rows_written,
            "first_batch_rows_report": report.first_batch_rows, "rows_per_s_report": report.rows_per_s,
            "output_tokens": report.output_tokens, **steady(arrivals)}


def check_stage_output(workdir: Path, n_images: int, report) -> None:
    """Every image got exactly one row, and no row is an error: else the timing means nothing."""
    import pyarrow.parquet as pq

    from pipelines import store
    table = pq.read_table(workdir / store.DESCRIPTIONS_DIR)
    ids = table.column("item_id").to_pylist()
    problems = []
    if len(ids) != n_images or len(set(ids)) != n_images:
        problems.append(f"{len(ids)} rows for {len(set(ids))} distinct items, expected {n_images}")
    errors = [e for e in table.column("error_kind").to_pylist() if e]
    if errors or report.error_rows:
        problems.append(f"{len(errors)} error rows: {sorted(set(errors))}")
    tokens = set(table.column("output_tokens").to_pylist())
    if tokens != {MAX_TOKENS}:
        problems.append(f"output lengths {sorted(tokens)}, expected all {MAX_TOKENS}")
    if problems:
        raise RuntimeError("stage output check failed: " + "; ".join(problems))


# --------------------------------------------------------------------------- load rates

def naive_load(path: Path, cfg: MediaConfig) -> np.ndarray:
    """The obvious loader: full-size decode, then one BICUBIC resize to the same target size."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return np.asarray(rgb.resize(target_size(rgb.width, rgb.height, cfg), Image.Resampling.BICUBIC))


def rate(fn, items: list, rounds: int) -> float:
    """Median items/s over `rounds` passes; one process, one thread: items/s per core."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        rates.append(len(items) / (time.perf_counter() - t0))
    return statistics.median(rates)


def load_rates(images: list[Path], videos: dict[str, Path]) -> dict:
    results = {}
    for label, cfg in (("448x448", MediaConfig()), ("224x224", MediaConfig(max_pixels=224 * 224))):
        rate(lambda p: load_image(p, cfg), images[:10], 1)  # warm the page cache and PIL's plugins
        # alternate the two loaders round by round, so drift hits both
        stage_rates, naive_rates = [], []
        for _ in range(3):
            stage_rates.append(rate(lambda p: load_image(p, cfg), images, 1))
            naive_rates.append(rate(lambda p: naive_load(p, cfg), images, 1))
        out_h, out_w = load_image(images[0], cfg).pixels.shape[:2]
        results[f"jpeg_{label}"] = {"items": len(images), "output": f"{out_w}x{out_h}",
                                    "load_image_per_s": statistics.median(stage_rates),
                                    "naive_per_s": statistics.median(naive_rates)}
    for name, path in videos.items():
        load_video(path, MediaConfig())  # starts the decoder helper process: not part of the rate
        rounds = 5 if name == "10s" else 3
        media = load_video(path, MediaConfig())
        results[f"video_{name}"] = {"frames_out": int(media.pixels.shape[0]),
                                    "output": f"{media.pixels.shape[2]}x{media.pixels.shape[1]}",
                                    "load_video_per_s": rate(lambda p: load_video(p, MediaConfig()), [path], rounds)}
    return results


# --------------------------------------------------------------------------- report

def summarize(runs: list[dict]) -> dict:
    plain = [r for r in runs if r["route"] == "plain"]
    stage = [r for r in runs if r["route"] == "stage"]
    # pair each stage run with the plain run just before it
    ratios = [s["steady_rows_per_s"] / p["steady_rows_per_s"] for p, s in zip(plain, stage)]
    report_ratios = [s["rows_per_s_report"] / p["steady_rows_per_s"] for p, s in zip(plain, stage)]
    return {"ratios": ratios, "median_ratio": statistics.median(ratios),
            "report_ratios": report_ratios, "median_report_ratio": statistics.median(report_ratios)}


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
    import ray
    import vllm
    lines = [f"Machine: {results['machine']}; vllm {vllm.__version__}, ray {ray.__version__}. "
             f"{results['images']} JPEGs 640x480 (q90) scaled to <= 224*224, tiny Qwen2-VL "
             f"(random weights), greedy, {MAX_TOKENS} output tokens each, {BATCH} requests per engine call.", ""]
    if results.get("runs"):
        lines += ["| run | route | start-up to first batch (s) | engine start (s) | steady images/s "
                  "| stage/plain |", "|---|---|---|---|---|---|"]
        summary = results["summary"]
        pair = 0
        for i, run in enumerate(results["runs"], 1):
            ratio = ""
            if run["route"] == "stage":
                ratio = f"{summary['ratios'][pair]:.2f}"
                pair += 1
            engine = f"{run['startup_s']:.1f}" if run["route"] == "plain" else "-"
            lines.append(f"| {i} | {run['route']} | {run['first_batch_s']:.1f} | {engine} | "
                         f"{run['steady_rows_per_s']:.1f} | {ratio} |")
        lines += ["", f"**Median steady ratio stage/plain: {summary['median_ratio']:.2f}** (target >= 0.95). "
                  f"With the stage's own `rows_per_s` (its wall time includes the end of the run): "
                  f"{summary['median_report_ratio']:.2f}.", ""]
    rates = results["load_rates"]
    lines += ["CPU load + preprocess, one process (items/s per core):", "",
              "| input | output | `pipelines.media` | naive PIL (no draft) | gain |", "|---|---|---|---|---|"]
    for key in ("jpeg_448x448", "jpeg_224x224"):
        r = rates[key]
        lines.append(f"| JPEG 640x480, max_pixels {key[5:].replace('x', '*')} | {r['output']} | "
                     f"{r['load_image_per_s']:.0f} | {r['naive_per_s']:.0f} | "
                     f"{r['load_image_per_s'] / r['naive_per_s']:.2f}x |")
    for key, label in (("video_10s", "10 s"), ("video_2min", "2 min")):
        r = rates[key]
        lines.append(f"| H.264 640x360 30 fps, {label}, {r['frames_out']} uniform frames | {r['output']} | "
                     f"{r['load_video_per_s']:.1f} | - | - |")
    return "\n".join(lines) + "\n"


DOCS_HEADER = """# Benchmarks

Speed here is always a ratio against a baseline run side by side in the same script: absolute
times on shared machines are noise. Each section says which machine gave its numbers.

How to run (from the repository root):

- describe stage vs plain vLLM, and media load rates: `.venv/bin/python bench/describe.py`
  (`--images N`, `--repeats N`; data and raw JSON under `bench/out/`, which git ignores)
"""


def update_docs(section: str) -> None:
    """Rewrite the '## describe' section of docs/benchmarks.md, keeping every other section."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else DOCS_HEADER
    begin, end = "<!-- bench/describe.py: begin -->", "<!-- bench/describe.py: end -->"
    block = f"{begin}\n## describe\n\n_Written by `bench/describe.py`._\n\n{section}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text, encoding="utf-8")


def main() -> None:
    args = parse_args()
    out = args.out.resolve()
    images = make_images(out / "images", args.images)
    videos = make_videos(out / "videos")
    results: dict = {"machine": machine(), "images": args.images, "runs": []}
    if not args.skip_engine:
        model = build_model(out)
        for repeat in range(args.repeats):
            for route in ("plain", "stage"):
                run = (run_plain(model, images) if route == "plain"
                       else run_stage(model, out / "images", out / "stage-workdir", args.images))
                print(f"[{repeat + 1}/{args.repeats}] {route}: first batch {run['first_batch_s']:.1f} s, "
                      f"steady {run['steady_rows_per_s']:.1f} images/s", flush=True)
                results["runs"].append(run)
        results["summary"] = summarize(results["runs"])
    results["load_rates"] = load_rates(images[:args.load_images], videos)
    (out / "describe-results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if not args.no_docs:
        update_docs(table)


if __name__ == "__main__":  # vLLM starts its engine process with spawn: it re-imports this file
    main()
