"""Does training learn? Tiny encoders (random CLIP vision tower, random BERT with a WordPiece
vocab built from the data) trained for a few hundred steps on the synthetic workdir: German
human captions of unseen test scenes must retrieve their image well above chance, although
training only saw English captions and their "machine translations".

The same harness runs the ablations by hand (every variant trained, printed side by side):
    python -m pipelines.synthetic learn --out runs/learn --ablations
This test trains the full model only and scores it global-only and fused.
"""

from __future__ import annotations

import pytest

from pipelines.synthetic import format_results, learning_check

pytestmark = pytest.mark.slow

STEPS, N_TEST = 300, 100


def test_german_text_to_image_beats_chance(tmp_path):
    results = learning_check(tmp_path, ["full"], steps=STEPS, n_train=400, n_val=50, n_test=N_TEST,
                             num_workers=1, threads=1)
    print("\n" + format_results(results))
    chance = results["chance_r1"]
    assert chance == pytest.approx(1.0)
    run = results["runs"]["full"]
    train = run["train"]
    assert train["finished"] and train["last_loss"] < 0.7 * train["first_loss"]
    assert train["best_val_rsum"] > 3 * 6 * chance           # val R@sum: 6 recalls, well above chance
    global_only, fused = run["test_w0.0"], run["test_w0.1"]
    assert global_only["t2v_r1"] > 3 * chance, format_results(results)
    assert global_only["t2v_r10"] > 3 * 10 * chance
    assert fused["t2v_r1"] > 2 * chance                      # the local scores do not wreck the ranking
