"""Efficacy on the testbed (``-m slow``, about 10 min each on an idle 2-core CPU): FK steering with 4
particles against plain sampling on all 95 held-out prompts, reported next to best-of-4 at equal
denoiser evaluations (benchmarks/efficacy_steering.py, which these tests run).

- Steered by the **oracle**, FK raises held-out accuracy beyond the seed noise: the machinery
  steers when the reward is right (RESULTS.md, the model shipped now, session 7: FK 0.368 vs
  plain 0.087; session-1 model: 0.179 vs 0.063).
- Steered by the shipped **learned** reward, the issue's claim, FK does not (yet): on the model
  shipped now FK gains +0.050, short of the 0.076 the test asks (RESULTS.md, session 7); on the
  session-1 model it was below plain sampling for three schedules and two seeds. The test is a strict
  ``xfail``: it documents the gap and turns into a failure the day FK starts to pass, so the
  marker is removed then.
"""

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

needs_model = pytest.mark.skipif(not (ROOT / "assets" / "testbed" / "sd" / "model_index.json").exists(),
                                 reason="the testbed base model is not shipped in this checkout")


def _fk_beats_plain(capsys, benchmark_script, reward):
    efficacy = benchmark_script("efficacy_steering")
    report = efficacy.run(reward=reward, seeds=(0,), progress=False)
    with capsys.disabled():
        print(f"\nsteering reward: {report['reward']}; model {report['model']}\n{efficacy.table(report)}")
    results = report["results"]
    plain, fk = results["plain"], results["fk-4-best"]
    noise = math.sqrt(plain["stderr"] ** 2 + fk["stderr"] ** 2)
    assert report["denoiser_evals"]["fk"] == report["denoiser_evals"]["best-of-n"]
    assert fk["accuracy"] > plain["accuracy"] + 2 * noise
    assert results["fk-4-sample"]["accuracy"] > plain["accuracy"] + 2 * noise


@pytest.mark.slow
@needs_model
def test_fk_steered_by_the_oracle_beats_plain_sampling_on_held_out_prompts(capsys, benchmark_script):
    _fk_beats_plain(capsys, benchmark_script, "testbed-oracle")


@pytest.mark.slow
@needs_model
@pytest.mark.skipif(not (ROOT / "assets" / "testbed" / "reward").is_dir(), reason="no shipped learned reward")
@pytest.mark.xfail(strict=True, reason="FK steered by the learned reward does not beat plain sampling yet "
                                       "(benchmarks/RESULTS.md, issue 7)")
def test_fk_steered_by_the_learned_reward_beats_plain_sampling_on_held_out_prompts(capsys, benchmark_script):
    _fk_beats_plain(capsys, benchmark_script, str(ROOT / "assets" / "testbed" / "reward"))
