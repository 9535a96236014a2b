"""Online reward fine-tuning optimises (``-m slow``; about 40 min on one core of the 2-core CPU):
PRDP, trained online on the shipped SD testbed model with a reward any working policy-gradient
objective can move (``brightness``, the mean pixel value, registered by
``benchmarks/efficacy_online.py``), raises that reward on *held-out* prompts it never sampled in
training, on the same noise as the base model's images.

Session 16 (benchmarks/RESULTS.md, PRDP section): lr 1e-3, clip 1e-3, beta 10, a refresh every 4
steps of 8 train prompts x 8 images, 120 steps: held-out brightness 0.630 -> 0.650 / 0.694 / 0.706
at steps 40 / 80 / 120; per refresh, +0.057 +- 0.007 over the base model's samples on the same
prompts and noise. This test runs the first 80 steps of that recipe (constant lr, so the same
steps as that run's first 80).

It guards the objective's machinery (collection, log-ratios against the sampling snapshot, the
reward-difference regression, the proximal clip, the online refresh) end to end: a sign error, a
detached log-prob or a clip that freezes the update leaves brightness where it was. It does not
show the issue's claim on a learned reward (`testbed-clip`: no gain at CPU budgets, see RESULTS)."""

import json

import pytest

from rewards import registry


@pytest.mark.slow
def test_prdp_raises_a_learnable_reward_on_heldout_prompts(tmp_path, benchmark_script, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the script's brightness stays here
    efficacy = benchmark_script("efficacy_online")
    efficacy.main(["--reward", "brightness", "--methods", "prdp", "--steps", "80", "--refresh-every", "4",
                   "--prompts-per-refresh", "8", "--group-size", "8", "--batch-size", "32", "--eval-every", "40",
                   "--eval-stride", "2", "--eval-images", "1", "--lr", "1e-3", "--clip-range", "1e-3",
                   "--beta", "10", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "efficacy_online_prdp.json").read_text())
    base = result["base"]["rewards"]["brightness"]
    (prdp,) = result["methods"]
    curve = [(point["step"], point["rewards"]["brightness"]) for point in prdp["curve"]]
    assert [step for step, _ in curve] == [40, 80], curve
    (_, at_40), (_, at_80) = curve
    # measured in session 16's 120-step run: base 0.630, step 40 0.650, step 80 0.694
    assert at_80 > base + 0.03 and at_80 > at_40, (base, curve)
    rewards = [r["reward_mean"] for r in prdp["train_reward"]]
    assert len(rewards) == 20 and all(r == r for r in rewards), rewards  # one mean per refresh, none NaN
