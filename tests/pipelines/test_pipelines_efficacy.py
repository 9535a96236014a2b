"""Efficacy on the testbed (``-m slow``; about 10 min per noise seed on an idle 2-core CPU): FK
steering with 4 particles against plain sampling on all 95 held-out prompts, reported next to
best-of-4 at equal denoiser evaluations (benchmarks/efficacy_steering.py, which these tests run).

- Steered by the **oracle**, FK raises held-out accuracy beyond the seed noise: the machinery
  steers when the reward is right (RESULTS.md, the model shipped now, session 7: FK 0.368 vs
  plain 0.087; session-1 model: 0.179 vs 0.063).
- Steered by a shipped **learned** reward, the issue's claim: `testbed-clip` with resampling at
  steps 12-18 (where it judges x0-predictions about as well as finished images, chosen on train
  prompts' trajectories; RESULTS.md session 11), three noise seeds pooled: FK's best particle
  0.147 vs plain 0.094 (+0.053 against twice the noise, 0.046; every seed up), best-of-4 0.133.
  A random final particle (0.126) does not clear the noise with this reward, so only the best
  particle, what FK returns, is asserted. With the default schedule (steps 4-16) or the HPS-style
  `testbed-reward`, FK stayed within the noise (sessions 3-9).
"""

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

needs_model = pytest.mark.skipif(not (ROOT / "assets" / "testbed" / "sd" / "model_index.json").exists(),
                                 reason="the testbed base model is not shipped in this checkout")


def _fk_beats_plain(capsys, benchmark_script, reward, seeds=(0,), fk_options=None, random_particle=True):
    efficacy = benchmark_script("efficacy_steering")
    report = efficacy.run(reward=reward, seeds=seeds, fk_options=fk_options, progress=False)
    with capsys.disabled():
        print(f"\nsteering reward: {report['reward']}; model {report['model']}\n{efficacy.table(report)}")
    results = report["results"]
    plain, fk, best_of = results["plain"], results["fk-4-best"], results["best-of-4"]
    noise = math.sqrt(plain["stderr"] ** 2 + fk["stderr"] ** 2)
    assert report["denoiser_evals"]["fk"] == report["denoiser_evals"]["best-of-n"]
    assert fk["accuracy"] > plain["accuracy"] + 2 * noise
    assert fk["accuracy"] >= best_of["accuracy"] - best_of["stderr"]  # matches or beats best-of-4
    if random_particle:
        assert results["fk-4-sample"]["accuracy"] > plain["accuracy"] + 2 * noise


@pytest.mark.slow
@needs_model
def test_fk_steered_by_the_oracle_beats_plain_sampling_on_held_out_prompts(capsys, benchmark_script):
    _fk_beats_plain(capsys, benchmark_script, "testbed-oracle")


@pytest.mark.slow
@needs_model
@pytest.mark.skipif(not (ROOT / "assets" / "testbed" / "clip").is_dir(), reason="no shipped testbed-clip reward")
def test_fk_steered_by_a_learned_reward_beats_plain_sampling_on_held_out_prompts(capsys, benchmark_script):
    late = {"lmbda": 10.0, "potential": "diff", "resample_start": 12, "resample_end": 18, "resample_every": 2}
    _fk_beats_plain(capsys, benchmark_script, "testbed-clip", seeds=(0, 1, 2), fk_options=late, random_particle=False)
