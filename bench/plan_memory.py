"""Driver memory and planning time at scale (issue 11): a describe dry run with the five
default views over manifests of 100k and 1M items (half of them already described; --sizes
takes 10M too), and a translate dry run over 100k
and 1M English captions (half already translated), each in a fresh child process whose peak
RSS is the figure; and the planning time of 1M items against a plain pyarrow anti-join of
the same two tables in the same process (the baseline a user would write: it plans one view,
with no attempts, and holds both tables in memory).

With --bucket-sizes, the same describe dry run with the workdir in an S3 bucket (moto's S3
server on loopback, an emulator): the planner copies the key columns down 64k rows at a
time, so the driver should stay as flat.

With --real, also a real describe run (Ray executor, openai engine against the instantly
answering endpoint of bench/ceiling.py on loopback) over smaller manifests, whose driver peak
RSS should not grow with the item count.

    python -m bench.plan_memory [--sizes 100000,1000000] [--bucket-sizes 100000,1000000] [--real 2000,8000]
                                [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "plan_memory.json"
CHUNK = 250_000
MODEL = "instant-endpoint"      # the name bench/ceiling.py's endpoint serves


def make_workdir(folder: Path, items: int, done_every: int = 2, image: Path | None = None) -> Path:
    """A workdir with `items` manifest rows (COCO-like ids and paths) and, for every
    `done_every`-th item, a description in each of the stage's five default views, written in
    chunks (bounded memory). With `image`, every item points at that one file (a real run
    needs real media)."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    import schemas
    (folder / "manifest").mkdir(parents=True, exist_ok=True)
    (folder / "descriptions").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    fingerprints = describe_fingerprints(folder)
    for start in range(0, items, CHUNK):
        ids = [f"coco2017:{i:012d}" for i in range(start, min(items, start + CHUNK))]
        n = len(ids)
        root = str(image.parent) if image else "/data/coco/train2017"
        columns = {"item_id": ids, "dataset": ["coco2017"] * n, "split": ["train2017"] * n,
                   "media_type": ["image"] * n, "root": [root] * n,
                   "relpath": [image.name] * n if image else [f"{i[9:]}.jpg" for i in ids],
                   "source_id": [i[9:] for i in ids], "size_bytes": [160_000] * n}
        pq.write_table(_table(columns, schemas.MANIFEST, n), folder / "manifest" / f"m-{start:09d}.parquet")
        done = [(item, view, fp) for item in ids[::done_every] for view, fp in fingerprints.items()]
        k = len(done)
        columns = {"item_id": [d[0] for d in done], "view": [d[1] for d in done], "media_type": ["image"] * k,
                   "text": ["A man rides a red bicycle along a wet street at dusk, past parked cars."] * k,
                   "finish_reason": ["stop"] * k, "engine": ["openai"] * k, "model": [MODEL] * k,
                   "fingerprint": [d[2] for d in done],
                   "created_at": pa.array([now] * k, pa.timestamp("us", tz="UTC")), "attempt": [1] * k}
        pq.write_table(_table(columns, schemas.DESCRIPTIONS, k), folder / "descriptions" / f"part-{start:09d}.parquet")
    return folder


def _table(columns: dict, schema, n: int):
    import pyarrow as pa
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
                                 for f in schema], schema=schema)


def make_translate_workdir(folder: Path, captions: int, done_every: int = 2) -> Path:
    """A workdir with `captions` English human captions (5 per item, many repeated texts as in
    COCO) and a Portuguese translation of every `done_every`-th, written in chunks."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    import schemas
    (folder / "captions").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    fingerprint = translate_fingerprint(folder)
    words = ["dog", "cat", "man", "woman", "bus", "train", "bicycle", "horse", "kite", "pizza", "surfer", "clock"]
    for start in range(0, captions, CHUNK):
        n = min(captions, start + CHUNK) - start
        ids = [f"coco2017:{i // 5:012d}:cap{i % 5}" for i in range(start, start + n)]
        texts = [f"A {words[i % 12]} next to a {words[(i // 12) % 12]} on a street number {i % 7919}."
                 for i in range(start, start + n)]
        columns = {"caption_id": ids, "item_id": [i.rsplit(":", 1)[0] for i in ids], "split": ["train"] * n,
                   "lang": ["en"] * n, "text": texts, "origin": ["human"] * n}
        pq.write_table(_table(columns, schemas.CAPTIONS, n), folder / "captions" / f"human-en-{start:09d}.parquet")
        done = ids[::done_every]
        k = len(done)
        columns = {"caption_id": [f"mt:{c}" for c in done], "item_id": [c.rsplit(":", 1)[0] for c in done],
                   "split": ["train"] * k, "lang": ["pt"] * k, "text": ["Um cão ao lado de um gato."] * k,
                   "origin": ["mt"] * k, "source_caption_id": done, "source_lang": ["en"] * k,
                   "fingerprint": [fingerprint] * k, "created_at": pa.array([now] * k, pa.timestamp("us", tz="UTC")),
                   "attempt": [1] * k}
        pq.write_table(_table(columns, schemas.CAPTIONS, k), folder / "captions" / f"mt-pt-{start:09d}.parquet")
    return folder


def translate_args(workdir: Path) -> list[str]:
    return ["translate", "--workdir", str(workdir), "--to", "pt", "--engine", "openai", "--model", MODEL,
            "--base-url", "http://127.0.0.1:9/v1", "--no-progress"]


def translate_fingerprint(workdir: Path) -> str:
    """The fingerprint the stage gives target "pt" with translate_args (so half is done)."""
    from pipelines import translate
    from pipelines.engines.base import EngineConfig
    from pipelines.mt_engines.base import MTSettings, pair_spec
    cfg = translate.TranslateConfig(workdir=workdir, targets=("pt",), engine=EngineConfig(
        engine="openai", model=MODEL, base_url="http://127.0.0.1:9/v1"))
    specs = {"pt": pair_spec(cfg.engine, MTSettings(prompt=cfg.prompt), "en", "pt")}
    return translate.fingerprints(cfg, translate.model_revision(cfg.engine), specs)["pt"]


def describe_args(workdir: Path, base_url: str = "http://127.0.0.1:9/v1") -> list[str]:
    """describe with its five default views (a real captioning run asks for several)."""
    return ["describe", "--workdir", str(workdir), "--engine", "openai", "--model", MODEL,
            "--base-url", base_url, "--no-progress"]


def describe_fingerprints(workdir: Path) -> dict[str, str]:
    """The fingerprint of each default view with describe_args (so that half is done)."""
    from pipelines import describe
    from pipelines.engines.base import EngineConfig
    cfg = describe.DescribeConfig(workdir=workdir, engine=EngineConfig(engine="openai", model=MODEL,
                                                                      base_url="http://127.0.0.1:9/v1"))
    return describe.view_fingerprints(cfg, describe.model_revision(cfg.engine))


def peak_rss_of_cli(args: list[str]) -> dict:
    """Run the CLI in a fresh child process; its own peak RSS (MB), exit code and wall time."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child would report
    # this (large) parent's peak; VmHWM belongs to the child's own address space
    code = ("import runpy, sys, json\n"
            f"sys.argv = ['leccr-pipe'] + {args!r}\n"
            "rc = 0\n"
            "try:\n    runpy.run_module('pipelines.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code or 0\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print('PEAK', json.dumps({'rc': rc, 'peak_mb': int(hwm.split()[1]) / 1024}))\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("PEAK ")), None)
    if line is None:
        raise RuntimeError(f"no result: {done.stderr[-3000:]}")
    result = json.loads(line[5:])
    result["wall_s"] = time.perf_counter() - started
    result["stderr_tail"] = done.stderr[-600:]
    return result


def planning_times(workdir: Path) -> dict:
    """Our planner against what a user would write with pyarrow: both tables in memory, the
    manifest repeated once per view, a left-anti join on (item_id, view) against the done rows
    of the current fingerprints (no attempts, no ingest errors)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.plan import describe_plan
    fingerprints = describe_fingerprints(workdir)
    started = time.perf_counter()
    manifest = pq.read_table(workdir / "manifest", columns=["item_id", "media_type", "root", "relpath"])
    keys = pa.concat_tables([manifest.append_column("view", pa.array([view] * manifest.num_rows))
                             for view in fingerprints])
    done = pq.read_table(workdir / "descriptions", columns=["item_id", "view", "fingerprint"])
    done = done.filter(pc.is_in(done.column("fingerprint"), pa.array(list(fingerprints.values()))))
    todo = keys.join(done.select(["item_id", "view"]), keys=["item_id", "view"], join_type="left anti")
    baseline_s = time.perf_counter() - started
    started = time.perf_counter()
    plan = describe_plan(workdir, fingerprints, None, False)
    ours_s = time.perf_counter() - started
    try:
        assert plan.rows_todo == todo.num_rows, (plan.rows_todo, todo.num_rows)
    finally:
        plan.close()
    return {"items": manifest.num_rows, "todo_rows": todo.num_rows, "pyarrow_anti_join_s": baseline_s,
            "plan_s": ours_s, "ratio": ours_s / baseline_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--timing-size", type=int, default=1_000_000)
    parser.add_argument("--real", default="", help="item counts for real runs, e.g. 5000,20000")
    parser.add_argument("--translate-sizes", default="100000,1000000", help="caption counts for translate dry runs")
    parser.add_argument("--bucket-sizes", default="", help="item counts for dry runs on a workdir in a bucket")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    results: dict = {"dry_run": {}, "translate_dry_run": {}, "bucket_dry_run": {}, "real_run": {},
                     "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            workdir = make_workdir(Path(tmp) / f"w{size}", size)
            results["dry_run"][size] = peak_rss_of_cli([*describe_args(workdir), "--dry-run"])
            print(f"dry run {size:>9} items: peak {results['dry_run'][size]['peak_mb']:.0f} MB, "
                  f"{results['dry_run'][size]['wall_s']:.1f} s", flush=True)
            if size == args.timing_size:
                results["planning"] = planning_times(workdir)
                print(f"planning {size} items: {results['planning']}", flush=True)
        for size in [int(s) for s in args.translate_sizes.split(",") if s]:
            workdir = make_translate_workdir(Path(tmp) / f"t{size}", size)
            results["translate_dry_run"][size] = peak_rss_of_cli([*translate_args(workdir), "--dry-run"])
            print(f"translate dry run {size:>9} captions: peak {results['translate_dry_run'][size]['peak_mb']:.0f} MB, "
                  f"{results['translate_dry_run'][size]['wall_s']:.1f} s", flush=True)
        if args.bucket_sizes:
            results["bucket_dry_run"] = bucket_dry_runs(Path(tmp), [int(s) for s in args.bucket_sizes.split(",")])
        if args.real:
            results["real_run"] = real_runs(Path(tmp), [int(s) for s in args.real.split(",")])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=1, default=str)[:4000])
    if not args.no_docs:
        from bench.docs_section import replace_section
        replace_section("plan_memory.py", "## Driver memory and planning at scale (bench/plan_memory.py)\n\n"
                        + "\n".join(docs_lines(results)) + "\n")


def real_runs(tmp: Path, sizes: list[int]) -> dict:
    """Real describe runs (Ray) against an instant endpoint: the driver's peak RSS by size."""
    from PIL import Image

    from bench.ceiling import Endpoint
    image = tmp / "media" / "one.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 80, 40)).save(image)
    out = {}
    with Endpoint() as endpoint:
        for size in sizes:
            workdir = make_workdir(tmp / f"real{size}", size, image=image)
            out[size] = peak_rss_of_cli(describe_args(workdir, f"{endpoint.root_url}/v1"))
            print(f"real run {size:>7} items: driver peak {out[size]['peak_mb']:.0f} MB, {out[size]['wall_s']:.1f} s",
                  flush=True)
    return out


def bucket_dry_runs(tmp: Path, sizes: list[int]) -> dict:
    """Describe dry runs with the workdir in an S3 bucket (moto's S3 server: an emulator)."""
    from pipelines import storage
    from tests.servers import s3_emulator
    out = {}
    with s3_emulator(tmp / "moto.log") as s3:
        saved = dict(os.environ)
        os.environ.update(s3.env())     # the child processes reach the emulator through these
        storage.reset_filesystems()
        try:
            s3.client().create_bucket(Bucket="bench")
            for size in sizes:
                local = make_workdir(tmp / f"b{size}", size)
                s3.upload(local, "bench", f"w{size}")
                args = describe_args(local)
                args[args.index("--workdir") + 1] = f"s3://bench/w{size}"
                out[size] = peak_rss_of_cli([*args, "--dry-run"])
                print(f"bucket dry run {size:>9} items: peak {out[size]['peak_mb']:.0f} MB, "
                      f"{out[size]['wall_s']:.1f} s (rc {out[size]['rc']})", flush=True)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return out


def _size_table(first_column: str, what: str, runs: dict) -> list[str]:
    lines = ["", f"| {first_column} | {what}: driver peak RSS | wall |", "|---|---|---|"]
    return lines + [f"| {int(size):,} | {r['peak_mb']:.0f} MB | {r['wall_s']:.1f} s |" for size, r in runs.items()]


def docs_lines(results: dict) -> list[str]:
    dry = {int(size): r for size, r in results["dry_run"].items()}
    lines = _size_table("manifest items (half done), 5 views", "describe dry run", dry)
    if 100_000 in dry and 1_000_000 in dry:
        lines.append(f"\n1M / 100k peak: **{dry[1_000_000]['peak_mb'] / dry[100_000]['peak_mb']:.2f}x** "
                     f"(target <= 1.2x).")
    if results.get("translate_dry_run"):
        lines += _size_table("English captions (half translated)", "translate dry run", results["translate_dry_run"])
    if "planning" in results:
        p = results["planning"]
        lines.append(f"\nPlanning {p['items']:,} items x 5 views: {p['plan_s']:.2f} s, a plain pyarrow anti-join of "
                     f"the same tables {p['pyarrow_anti_join_s']:.2f} s: ratio **{p['ratio']:.2f}**.")
    bucket = {int(size): r for size, r in results.get("bucket_dry_run", {}).items()}
    if bucket:
        lines += _size_table("manifest items (half done), 5 views", "describe dry run, workdir in a bucket "
                             "(moto S3 emulator)", bucket)
        if 100_000 in bucket and 1_000_000 in bucket:
            lines.append(f"\n1M / 100k peak, bucket: **{bucket[1_000_000]['peak_mb'] / bucket[100_000]['peak_mb']:.2f}x**.")
    if results.get("real_run"):
        lines += _size_table("manifest items (half done), 5 views", "real run (Ray, instant endpoint)",
                             results["real_run"])
    return lines[1:]

if __name__ == "__main__":
    main()
