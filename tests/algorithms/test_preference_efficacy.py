"""Efficacy of the preference methods on the testbed (``-m slow``; about 30 min each on a free
2-core CPU; one short form runs in the default suite), on the shipped SD model (continued on a
GPU in session 6) and the SD3-style flow model:

- on-policy feedback labelled by the **oracle** (6 samples per train prompt), Diffusion-KTO with
  LoRA raises held-out oracle accuracy beyond the base model's seed-to-seed noise (the figure in
  benchmarks/RESULTS.md: 0.082 -> 0.146, +12 of 190 images on each of 3 seeds);
- labelled by the shipped CLIP-score-style **learned reward** `testbed-clip` (the issue's claim:
  a learned labeller), it does too (session 7: 0.082 -> 0.137, +0.054 +- 0.016, every seed up);
- labelled by the HPS-style `testbed-reward`, it does not (KTO -0.002 +- 0.012 while the learned
  rewards rise; on this model's samples it agrees with the oracle less than `testbed-clip`): a
  strict xfail, to be removed when it passes.

Diffusion-DPO alone is within the noise on the same data (beta 5000 / lr 3e-4, and beta 1000 /
lr 1e-3). **DPO with its SFT term on the winners** (beta 1000, lr 1e-3, ``sft_weight`` 250, about
the DPO term's gradient scale at the start) raises it beyond the noise (session 8: 0.082 -> 0.168,
+0.086 +- 0.007, every seed up); that is asserted. Most of the gain is the SFT term's: SFT on the
winners alone gives +0.072 +- 0.018 (RESULTS.md), so this test shows the recipe works, not that
the pairwise term adds to it. The same recipe moves the **flow** model (Flow-DPO + SFT term,
session 9: 0.072 -> 0.116, +0.044 +- 0.010, every seed up), which no earlier recipe did."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REWARD = ROOT / "assets" / "testbed" / "reward" / "reward.json"
CLIP = ROOT / "assets" / "testbed" / "clip" / "open_clip_config.json"


def _run(benchmark_script, out: Path, reward: str, images_per_prompt: int, objective: str = "kto",
         extra: tuple[str, ...] = (), model: str = "sd") -> tuple[dict, ...]:
    """Run ``benchmarks/efficacy_preference.py``; its rows: the base model's, then one per objective
    (``objective`` may list several, comma-separated)."""
    efficacy = benchmark_script("efficacy_preference")
    efficacy.main(["--model", str(ROOT / "assets" / "testbed" / model), "--reward", reward, "--objectives", objective,
                   "--images-per-prompt", str(images_per_prompt), "--out", str(out), *extra])
    result = json.loads((out / "efficacy.json").read_text())
    base, *tuned = result["rows"]
    assert [row["model"] for row in tuned] == objective.split(",")
    return (base, *tuned)


def _assert_raised(base: dict, kto: dict) -> None:
    assert kto["gain_mean"] > 2 * kto["gain_stderr"] and kto["gain_mean"] > 0.01, kto
    assert all(tuned >= before for tuned, before in zip(kto["accuracy_per_seed"], base["accuracy_per_seed"])), (base, kto)


@pytest.mark.slow
@pytest.mark.parametrize("reward, images_per_prompt, measured", [
    ("testbed-oracle", 6, 0.063),
    pytest.param("testbed-clip", 4, 0.054, marks=pytest.mark.skipif(
        not CLIP.is_file(), reason="no shipped CLIP-score-style testbed reward")),
])
def test_kto_on_feedback_raises_heldout_oracle_accuracy(tmp_path, benchmark_script, reward, images_per_prompt, measured):
    base, kto = _run(benchmark_script, tmp_path, reward, images_per_prompt=images_per_prompt)
    _assert_raised(base, kto)
    assert kto["gain_mean"] > 0.03, (kto, f"measured +{measured}")


@pytest.mark.slow
@pytest.mark.skipif(not CLIP.is_file(), reason="no shipped CLIP-score-style testbed reward")
@pytest.mark.parametrize("model, least, measured", [("sd", 0.04, 0.086), ("sd3", 0.025, 0.044)])  # sd3: Flow-DPO
def test_dpo_with_its_sft_term_on_learned_reward_pairs_raises_heldout_oracle_accuracy(tmp_path, benchmark_script,
                                                                                      model, least, measured):
    base, dpo = _run(benchmark_script, tmp_path, "testbed-clip", images_per_prompt=4, objective="dpo", model=model,
                     extra=("--beta", "1000", "--lr", "1e-3", "--sft-weight", "250"))
    _assert_raised(base, dpo)
    assert dpo["gain_mean"] > least, (dpo, f"measured +{measured}")


@pytest.mark.slow
@pytest.mark.skipif(not CLIP.is_file(), reason="no shipped CLIP-score-style testbed reward")
def test_flow_kto_on_learned_reward_feedback_raises_heldout_oracle_accuracy(tmp_path, benchmark_script):
    base, kto = _run(benchmark_script, tmp_path, "testbed-clip", images_per_prompt=4, model="sd3",
                     extra=("--lr", "1e-3"))
    _assert_raised(base, kto)
    assert kto["gain_mean"] > 0.02, (kto, "measured +0.040")


@pytest.mark.skipif(not CLIP.is_file(), reason="no shipped CLIP-score-style testbed reward")
def test_short_form_dpo_and_kto_on_learned_reward_data_raise_heldout_oracle_accuracy(tmp_path, benchmark_script):
    """The CI-sized form of the claims above (about 4 minutes on one core): on-policy data from 48
    train prompts x 4 samples of the shipped SD model at 10 sampling steps, labelled by the learned
    reward ``testbed-clip``; DPO with its SFT term (beta 1000, ``sft_weight`` 250) and KTO, 40 steps
    of 8, lr 1e-3; held-out accuracy on the 95 held-out prompts x 1 image, one noise seed (the same
    noise for every model). Measured (RESULTS.md, session 9): base 0.032, DPO + SFT 0.063 (+3
    images of 95), KTO 0.084 (+5); the assertion asks for +2 each, a higher GenEval score, and a
    rise of the labeller's score under DPO. One seed cannot separate a gain from noise: the slow
    tests above do that; this one fails when the recipe stops moving the model the right way."""
    base, dpo, kto = _run(benchmark_script, tmp_path, "testbed-clip", images_per_prompt=4, objective="dpo,kto",
                          extra=("--max-prompts", "48", "--steps", "40", "--batch-size", "8", "--lr", "1e-3",
                                 "--beta", "1000", "--sft-weight", "250", "--eval-seeds", "1", "--eval-images", "1",
                                 "--sample-steps", "10"))
    for tuned in (dpo, kto):
        assert tuned["accuracy_mean"] - base["accuracy_mean"] >= 2 / 95 - 1e-6, (base, tuned)
        assert tuned["geneval_mean"] > base["geneval_mean"], (base, tuned)
    assert dpo["reward_gain"]["testbed-clip"] > 0.02, dpo  # DPO moved towards its labeller (measured +0.057)


@pytest.mark.slow
@pytest.mark.skipif(not REWARD.is_file(), reason="no shipped learned reward")
@pytest.mark.xfail(strict=True, reason="KTO on learned-reward feedback does not raise held-out oracle accuracy on the "
                                       "session-6 SD model (benchmarks/RESULTS.md); the learned reward was calibrated "
                                       "on the session-1 model's samples")
def test_kto_on_learned_reward_feedback_raises_heldout_oracle_accuracy(tmp_path, benchmark_script):
    base, kto = _run(benchmark_script, tmp_path, "testbed-reward", images_per_prompt=4)
    _assert_raised(base, kto)
