"""Efficacy of the preference methods on the testbed (``-m slow``; about 30 min on a free 2-core
CPU): on-policy pairs of the shipped SD model labelled by the shipped learned reward, KTO with
LoRA raises held-out oracle accuracy beyond the base model's seed-to-seed noise (the figure in
benchmarks/RESULTS.md: +0.028 +- 0.007 over 3 seeds). Diffusion-DPO's gain on the same data is
recorded there but is within the noise, so it is not asserted."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REWARD = ROOT / "assets" / "testbed" / "reward" / "reward.json"


@pytest.mark.slow
@pytest.mark.skipif(not REWARD.is_file(), reason="no shipped learned reward")
def test_kto_on_learned_reward_feedback_raises_heldout_oracle_accuracy(tmp_path, benchmark_script):
    efficacy = benchmark_script("efficacy_preference")
    efficacy.main(["--model", str(ROOT / "assets" / "testbed" / "sd"), "--reward", "testbed-reward",
                   "--objectives", "kto", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "efficacy.json").read_text())
    base, kto = result["rows"]
    assert kto["model"] == "kto"
    assert kto["gain_mean"] > 2 * kto["gain_stderr"] and kto["gain_mean"] > 0.01, kto
    assert all(tuned >= before for tuned, before in zip(kto["accuracy_per_seed"], base["accuracy_per_seed"])), result["rows"]
