"""Benchmark of the describe stage against a plain `vllm.LLM.generate` script, and of media loading.

    .venv/bin/python bench/describe.py [--images 512] [--repeats 2] [--out bench/out] [--skip-engine]

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
    args = parser.parse_args()
    if args.images < 2 * BATCH or args.repeats < 1:
        parser.error(f"need --images >= {2 * BATCH} (a steady window after the first batch) and --repeats >= 1")
    return args


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

    before = child_pids()
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
    arrivals, output_tokens, generate_s = [], 0, 0.0
    for start in range(0, len(images), BATCH):
        batch = [{"prompt": prompt, "multi_modal_data": {"image": load_image(p, STAGE_MEDIA).pixels}}
                 for p in images[start:start + BATCH]]
        generate_start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        if arrivals:  # after the first batch: the steady window
            generate_s += time.perf_counter() - generate_start
        output_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
        arrivals.append((time.perf_counter() - t0, len(outputs)))
        if len(arrivals) == 1:
            window = CpuWindow()  # the steady window starts here, as in the stage
    wall_s = time.perf_counter() - t0
    cpu = window.stop()
    shut_down(llm, child_pids() - before)
    if output_tokens != len(images) * MAX_TOKENS:  # same check as the stage's output gets
        raise RuntimeError(f"plain script: {output_tokens} output tokens, expected {len(images) * MAX_TOKENS}")
    rows_after = len(images) - arrivals[0][1]
    # generate calls alone, loading excluded: the stage loads while its engine starts
    generate_rate = rows_after / generate_s if generate_s else float("nan")
    return {"route": "plain", "startup_s": startup_s, "wall_s": wall_s, "rows": len(images),
            "output_tokens": output_tokens, "generate_only_rows_per_s": generate_rate,
            **steady(arrivals), **per_image(cpu, rows_after)}


def child_pids() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker (it lives as long
    as this process, whatever happens to the engine)."""
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(_cmdline(p))}


def _cmdline(process) -> list[str]:
    import psutil
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def shut_down(llm, engine_pids: set[int]) -> None:
    """Stop the engine core processes now, so that the stage that runs next has both cores."""
    import psutil
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    processes = []
    for pid in engine_pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    if alive:
        raise RuntimeError(f"vLLM engine processes still running after shutdown: {[p.pid for p in alive]}")


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and its live descendants: vLLM's engine
    processes, the local Ray cluster, the video decoder helper."""
    import psutil
    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


class CpuWindow:
    """CPU use over a window, ours and others'. The machine is shared: other users' load, not
    our code, is the largest noise in these numbers, so each run reports the share of the
    machine they took (system-wide busy CPU from /proc/stat less this process tree's CPU)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy_s = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait
        return time.perf_counter(), busy_s, tree_cpu_s()

    def stop(self) -> dict:
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self._sample()
        own = own1 - own0
        return {"own_cpu_s": own, "foreign_cpu_share": max(0.0, busy1 - busy0 - own) / ((t1 - t0) * os.cpu_count())}


def per_image(cpu: dict, rows: int) -> dict:
    """The steady window's CPU figures: others' share, and ours in CPU-ms per image (all our
    processes; for the plain script this includes loading the images, for the stage not)."""
    return {"foreign_cpu_share": cpu.get("foreign_cpu_share"),
            "own_cpu_ms_per_image": 1000 * cpu["own_cpu_s"] / rows if rows and "own_cpu_s" in cpu else None}


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
def watch_stage(t0: float):
    """Hook the stage's progress callback, which it calls once per batch that reaches the
    driver: the arrival times show whether results stream in while the engine works, and
    the foreign load is measured over the same first-to-last-batch window as the plain run's."""
    from pipelines import describe

    arrivals: list[tuple[float, int]] = []
    cpu: dict = {}
    original = describe.progress_bar

    @contextmanager
    def progress_bar(label, total, enabled=True):
        def advance(n: int) -> None:
            if not n:
                return
            arrivals.append((time.perf_counter() - t0, n))
            if len(arrivals) == 1:
                cpu["window"] = CpuWindow()
            elif sum(k for _, k in arrivals) == total:
                cpu.update(cpu.pop("window").stop())
        yield advance

    describe.progress_bar = progress_bar
    try:
        yield arrivals, cpu
    finally:
        describe.progress_bar = original


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
    t0 = time.perf_counter()
    with watch_stage(t0) as (arrivals, cpu):
        report = describe.run(cfg)
    ray.shutdown()  # the next plain run gets the machine without Ray's processes
    check_stage_output(workdir, n_images, report)
    return {"route": "stage", "startup_s": report.startup_s, "wall_s": report.wall_s, "rows": report.rows_written,
            "first_batch_rows_report": report.first_batch_rows, "rows_per_s_report": report.rows_per_s,
            "output_tokens": report.output_tokens, **steady(arrivals),
            **per_image(cpu, report.rows_written - arrivals[0][1])}


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
    window = CpuWindow()
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
    results["foreign_cpu_share"] = window.stop()["foreign_cpu_share"]
    return results


# --------------------------------------------------------------------------- report

def summarize(runs: list[dict]) -> dict:
    """Ratios of each stage run to the plain run just before it, and their medians.

    steady: the issue's measure, images/s after the first batch. engine_path: the stage's
    steady rate over the plain script's generate() calls alone; the stage loads images while
    its engine starts, so its steady window holds no loading while the plain one does, and
    this ratio shows what the pipeline costs (Ray, the actor, moving pixels) without that help.
    """
    plain = [r for r in runs if r["route"] == "plain"]
    stage = [r for r in runs if r["route"] == "stage"]
    pairs = list(zip(plain, stage))
    ratios = {
        "steady": [s["steady_rows_per_s"] / p["steady_rows_per_s"] for p, s in pairs],
        "steady_report": [s["rows_per_s_report"] / p["steady_rows_per_s"] for p, s in pairs],
        "engine_path": [s["steady_rows_per_s"] / p["generate_only_rows_per_s"] for p, s in pairs],
    }
    return {"ratios": ratios, "medians": {k: statistics.median(v) for k, v in ratios.items()}}


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
    lines = [f"Machine: {results['machine']}; vllm {results['versions']['vllm']}, "
             f"ray {results['versions']['ray']}. {results['images']} JPEGs 640x480 (q90) scaled to <= 224*224, "
             f"tiny Qwen2-VL (random weights), greedy, {MAX_TOKENS} output tokens each (ignore_eos), "
             f"{BATCH} requests per engine call in both routes. Command: `{results['command']}`.", ""]
    if results.get("runs"):
        lines += engine_table(results)
    lines += load_table(results["load_rates"])
    return "\n".join(lines) + "\n"


def engine_table(results: dict) -> list[str]:
    medians, ratios = results["summary"]["medians"], results["summary"]["ratios"]
    lines = ["| run | route | others' CPU share | our CPU ms/image | start-up to first batch (s) "
             "| steady images/s | plain generate() only, images/s | stage/plain steady "
             "| stage/plain generate() only |",
             "|---|---|---|---|---|---|---|---|---|"]
    pair = 0
    for i, run in enumerate(results["runs"], 1):
        foreign, own = run.get("foreign_cpu_share"), run.get("own_cpu_ms_per_image")
        cells = [str(i), run["route"], "-" if foreign is None else f"{foreign:.0%}",
                 "-" if own is None else f"{own:.0f}", f"{run['first_batch_s']:.1f}",
                 f"{run['steady_rows_per_s']:.1f}"]
        if run["route"] == "plain":
            cells += [f"{run['generate_only_rows_per_s']:.1f}", "", ""]
        else:
            cells += ["", f"{ratios['steady'][pair]:.2f}", f"{ratios['engine_path'][pair]:.2f}"]
            pair += 1
        lines.append("| " + " | ".join(cells) + " |")
    plain = [r for r in results["runs"] if r["route"] == "plain"]
    stage = [r for r in results["runs"] if r["route"] == "stage"]
    engine_start = statistics.median(r["startup_s"] for r in plain)
    lines += ["",
              f"**Median stage/plain steady throughput: {medians['steady']:.2f}** (target >= 0.95); "
              f"against the plain script's generate() calls alone: {medians['engine_path']:.2f}; "
              f"with the stage's own `rows_per_s` (wall time to the end of the run): {medians['steady_report']:.2f}.",
              "",
              f"Start-up (median): plain script {statistics.median(r['first_batch_s'] for r in plain):.1f} s to its "
              f"first batch, of which `LLM()` {engine_start:.1f} s, plus {results['cold_import_s']:.1f} s to import "
              f"vllm in a fresh process; stage {statistics.median(r['first_batch_s'] for r in stage):.1f} s from "
              f"`describe.run()` to the first batch at the driver (ingest, Ray, the engine actor with its imports "
              f"and `LLM()`, the first call).", ""]
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


def update_docs(section: str) -> None:
    """Rewrite the generated part of the '## describe' section of docs/benchmarks.md (between
    its markers); every other line of the file, notes under the section included, is kept."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else DOCS_HEADER
    begin, end = "<!-- bench/describe.py: begin -->", "<!-- bench/describe.py: end -->"
    block = f"{begin}\n_Written by `bench/describe.py`; notes below are by hand._\n\n{section}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n## describe\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text, encoding="utf-8")


def main() -> None:
    import ray
    import vllm

    args = parse_args()
    out = args.out.resolve()
    image_dir = out / f"images-{args.images}"  # the stage ingests the whole folder: exactly N images
    images = make_images(image_dir, args.images)
    videos = make_videos(out / "videos")
    results: dict = {"machine": machine(), "versions": {"vllm": vllm.__version__, "ray": ray.__version__},
                     "command": " ".join(["bench/describe.py", *sys.argv[1:]]), "images": args.images, "runs": []}
    if not args.skip_engine:
        model = build_model(out)
        results["cold_import_s"] = cold_import_s()
        for repeat in range(args.repeats):
            for route in ("plain", "stage"):  # alternated, so drift on the machine hits both
                run = (run_plain(model, images) if route == "plain"
                       else run_stage(model, image_dir, out / "stage-workdir", args.images))
                print(f"[{repeat + 1}/{args.repeats}] {route}: first batch {run['first_batch_s']:.1f} s, "
                      f"steady {run['steady_rows_per_s']:.1f} images/s, others' CPU share "
                      f"{run['foreign_cpu_share'] or 0:.0%}", flush=True)
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
