"""``visalign sample steer=...``: steered sampling from the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from visalign.cli import main


@pytest.fixture(scope="module")
def sd_folder(tiny_model_dir):
    return tiny_model_dir("sd")


def test_fk_writes_images_rewards_and_diagnostics(sd_folder, tmp_path):
    out = tmp_path / "fk"
    result = CliRunner().invoke(main, [
        "sample", f"model={sd_folder}", "prompts=[a red circle, a blue square]", "steps=3", "num_images_per_prompt=2",
        "steer=fk", "reward=testbed-oracle", "particles=2", "steering.potential=max", "steering.save_particles=true",
        f"out={out}",
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert all("reward" in r and len(r["particles"]) == 2 for r in records)
    assert (out / records[0]["file"]).exists() and (out / records[0]["particles"][1]["file"]).exists()
    report = json.loads((out / "steering.json").read_text())
    assert report["steer"] == "fk" and report["particles"] == 2
    batch = report["batches"][0]
    assert batch["method"] == "fk" and batch["options"]["potential"] == "max"
    assert batch["events"][-1]["final"] and len(batch["events"][-1]["ess"]) == 4  # 2 prompts x 2 images
    assert report["denoiser_evals"] == 3 * 4 * 2 * 2


def test_dashed_options_best_of_n(sd_folder, tmp_path):
    out = tmp_path / "bon"
    result = CliRunner().invoke(main, [
        "sample", f"--model={sd_folder}", "--prompts", "a red circle", "--steps", "2", "--num_images_per_prompt", "1",
        "--steer", "best-of-n", "--reward", "testbed-oracle", "--particles", "3", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "steering.json").read_text())
    assert report["steer"] == "best-of-n" and report["batches"][0]["num_particles"] == 3
    assert "mean reward" in result.output


def test_guidance_refuses_a_non_differentiable_reward(sd_folder, tmp_path):
    result = CliRunner().invoke(main, ["sample", f"model={sd_folder}", "prompts=a red circle", "steps=2",
                                       "steer=guidance", "reward=testbed-oracle", f"out={tmp_path / 'g'}"])
    assert result.exit_code == 1 and "not differentiable" in result.output


@pytest.mark.parametrize("args, message", [
    (["steer=fk"], "needs a reward"),
    (["steer=beam", "reward=testbed-oracle"], "steer must be one of fk, best-of-n, guidance"),
    (["steer=fk", "reward=no-such-reward"], "unknown reward 'no-such-reward'"),
    (["steer=fk", "reward=testbed-oracle", "steering.lmbda=x"], "steering.lmbda"),
])
def test_bad_steering_settings_are_clear_errors(sd_folder, tmp_path, args, message):
    result = CliRunner().invoke(main, ["sample", f"model={sd_folder}", "prompts=a", "steps=2", f"out={tmp_path / 'x'}", *args])
    assert result.exit_code != 0 and message in result.output, result.output
