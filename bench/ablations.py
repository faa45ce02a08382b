"""The synthetic ablation order (full / no softened matching / no slots / no descriptions), over
several training seeds, reported (never asserted) in docs/benchmarks.md.

    .venv/bin/python bench/ablations.py                       # 3 seeds x 4 variants, 200 steps each
    .venv/bin/python bench/ablations.py --seeds 42 --steps 60  # a quick look
    .venv/bin/python bench/ablations.py --render bench/out/ablations.json   # docs only

Every variant trains through the real train and evaluate stages (pipelines.synthetic.learning_check)
on the same synthetic German workdir and tiny encoders (built once from --data-seed); a seed is
the training seed (new layers' init, batch order, dropout). `--ablate` switches remove the
ablated parts and their parameters. Reported: German text->image R@1 and R@sum on test
(global scores), best validation R@sum, and the chance level of each from random scores on the
same split. Tiny random encoders on drawn scenes say whether the parts help *here*, not on the
paper's benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs_section import markers, replace_section  # noqa: E402
OUT = ROOT / "bench" / "out"
VARIANTS = ("full", "no_softened_matching", "no_slots", "no_descriptions")


def measure(args) -> dict:
    from pipelines.synthetic import chance_metrics, learning_check
    work = Path(args.work)
    runs: dict[str, dict[str, dict]] = {v: {} for v in VARIANTS}
    started = time.time()
    for seed in args.seeds:
        for variant in VARIANTS:
            t0 = time.time()
            res = learning_check(work, [variant], steps=args.steps, seed=args.data_seed, train_seed=seed,
                                 fusion_weights=(0.0,), threads=args.threads)
            run = res["runs"][variant]
            runs[variant][str(seed)] = {"test": run["test_w0.0"], "best_val_rsum": run["train"]["best_val_rsum"],
                                        "wall_s": time.time() - t0}
            print(f"seed {seed} {variant}: test t2v R@1 {run['test_w0.0']['t2v_r1']:.1f}, R@sum "
                  f"{run['test_w0.0']['rsum']:.1f} ({time.time() - t0:.0f} s)", flush=True)
    workdir = work / "workdir"
    chance = {split: chance_metrics(workdir, split, trials=500) for split in ("val", "test")}
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"runs": runs, "steps": args.steps, "seeds": args.seeds, "data_seed": args.data_seed,
            "chance": {s: {"rsum_mean": statistics.mean(c["rsum"]), "rsum_p99": q(c["rsum"], 0.99),
                           "t2v_r1_mean": statistics.mean(c["t2v_r1"])} for s, c in chance.items()},
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
                       f"torch threads {args.threads}", "wall_s": time.time() - started,
            "date": time.strftime("%Y-%m-%d")}


def render(res: dict) -> str:
    seeds = [str(s) for s in res["seeds"]]
    head = ["variant", *(f"t2v R@1 (seed {s})" for s in seeds), "t2v R@1 mean", *(f"R@sum (seed {s})" for s in seeds),
            "R@sum mean", "best val R@sum mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    label = {"full": "full", "no_softened_matching": "no softened matching (`--ablate softened`)",
             "no_slots": "no slots (`--ablate slots`)", "no_descriptions": "no descriptions (`--ablate descriptions`)"}
    means = {}
    for v in VARIANTS:
        per = res["runs"].get(v, {})
        r1 = [per[s]["test"]["t2v_r1"] for s in seeds if s in per]
        rs = [per[s]["test"]["rsum"] for s in seeds if s in per]
        val = [per[s]["best_val_rsum"] for s in seeds if s in per]
        if not r1:
            continue
        means[v] = statistics.mean(rs)
        lines.append("| " + " | ".join([label[v], *(f"{x:.1f}" for x in r1), f"{statistics.mean(r1):.1f}",
                                         *(f"{x:.1f}" for x in rs), f"{statistics.mean(rs):.1f}",
                                         f"{statistics.mean(val):.1f}"]) + " |")
    c = res["chance"]
    order = " > ".join(f"{v} ({m:.1f})" for v, m in sorted(means.items(), key=lambda kv: -kv[1]))
    return "\n".join([
        "## synthetic ablations (train)", "",
        "_Written by `bench/ablations.py`; reported, not asserted._", "",
        f"Synthetic German workdir (400 train / 50 val / 100 test drawn scenes, 2 captions each; data seed "
        f"{res['data_seed']}), tiny random encoders (2 layers x 64), {res['steps']} steps of batch 32 at lr 5e-4 per "
        f"run, one run per (variant, training seed). Test: German human captions -> images, global scores. "
        f"Machine: {res['machine']}, other jobs running; {res['date']}, {res['wall_s'] / 60:.0f} min in all.", "",
        *lines, "",
        f"Chance (random scores on the same split, 500 draws): test t2v R@1 {c['test']['t2v_r1_mean']:.1f}, test "
        f"R@sum mean {c['test']['rsum_mean']:.1f} (99th percentile {c['test']['rsum_p99']:.1f}); val R@sum mean "
        f"{c['val']['rsum_mean']:.1f} (99th percentile {c['val']['rsum_p99']:.1f}).", "",
        f"Order by mean test R@sum: {order}.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(OUT / "ablations-work"))
    ap.add_argument("--render", type=Path, help="Only put this results JSON into docs/benchmarks.md.")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    if args.render:
        res = json.loads(args.render.read_text())
    else:
        res = measure(args)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "ablations.json").write_text(json.dumps(res, indent=2, default=str))
    section = render(res)
    print(section)
    if not args.no_docs:
        replace_section("ablations.py", section, after=markers("train.py")[1])


if __name__ == "__main__":
    main()
