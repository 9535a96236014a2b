"""Efficacy on the testbed (``-m slow``, about 30 min on a 2-core CPU): FK steering with 4
particles raises held-out oracle accuracy over plain sampling by more than the seed noise, and
is reported next to best-of-4 at equal denoiser evaluations.

The steering reward is the learned reward at assets/testbed/reward when it exists, else the
oracle (see benchmarks/efficacy_steering.py, which this test runs).
"""

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "assets" / "testbed" / "sd" / "model_index.json").exists(),
                    reason="the testbed base model is not shipped in this checkout")
def test_fk_beats_plain_sampling_on_held_out_prompts(capsys, benchmark_script):
    efficacy = benchmark_script("efficacy_steering")
    report = efficacy.run(seeds=(0,), progress=False)
    with capsys.disabled():
        print(f"\nsteering reward: {report['reward']}; model {report['model']}\n{efficacy.table(report)}")
    results = report["results"]
    plain, fk = results["plain"], results["fk-4-best"]
    noise = math.sqrt(plain["stderr"] ** 2 + fk["stderr"] ** 2)
    assert fk["accuracy"] > plain["accuracy"] + 2 * noise
    assert results["fk-4-sample"]["accuracy"] > plain["accuracy"] + 2 * noise
    assert report["denoiser_evals"]["fk"] == report["denoiser_evals"]["best-of-n"]
