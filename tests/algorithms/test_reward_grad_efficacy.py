"""Efficacy of reward-gradient fine-tuning on the testbed (``-m slow``; about 45 min each on one core
of the 2-core CPU): backpropagating the learned reward ``testbed-clip`` raises held-out oracle
accuracy of the shipped SD model beyond the seed noise, and the reward with it
(benchmarks/RESULTS.md, six noise seeds, every seed up):

- AlignProp, 150 steps (session 9): 0.082 -> 0.140, +0.058 +- 0.012; reward +0.060 +- 0.011.
- ReFL, 300 steps (session 11): 0.082 -> 0.155, +0.073 +- 0.009; reward +0.075 +- 0.015.
- DRaFT-K (K = 1), 300 steps (session 11): 0.082 -> 0.148, +0.066 +- 0.020, five of six seeds up
  (one -0.005); reward +0.061 +- 0.017; at a large quality cost (0.85 -> 0.73, reported).

DRaFT at 150 steps (LV -0.004, K = 1 +0.026, full +0.042 +- 0.025) is not shown beyond noise and
is not asserted."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT / "assets" / "testbed" / "clip" / "open_clip_config.json"


@pytest.mark.slow
@pytest.mark.skipif(not CLIP.is_file(), reason="no shipped CLIP-score-style testbed reward")
@pytest.mark.parametrize("method,steps,measured,seeds_down", [("alignprop", 150, 0.058, 0), ("refl", 300, 0.073, 0),
                                                               ("draft-k", 300, 0.066, 1)])
def test_reward_gradient_on_the_learned_reward_raises_heldout_oracle_accuracy(tmp_path, benchmark_script, method,
                                                                               steps, measured, seeds_down):
    efficacy = benchmark_script("efficacy_reward_grad")
    efficacy.main(["--reward", "testbed-clip", "--methods", method, "--steps", str(steps), "--seed", "1",
                   "--eval-seeds", "6", "--eval-images", "2", "--out", str(tmp_path)])
    base, tuned = json.loads((tmp_path / "efficacy.json").read_text())["rows"]
    assert tuned["model"] == method
    assert tuned["gain_mean"] > 2 * tuned["gain_stderr"] and tuned["gain_mean"] > 0.03, (tuned, f"measured +{measured}")
    assert sum(a < b for a, b in zip(tuned["accuracy_per_seed"], base["accuracy_per_seed"])) <= seeds_down, (base, tuned)
    assert tuned["reward_mean"] > base["reward_mean"], tuned  # the optimised reward rises with the oracle
