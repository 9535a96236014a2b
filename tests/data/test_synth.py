"""``visalign dataset synth`` (Syn-Pic, ALGORITHMS.md §3.1): the vote-based phi by hand, the
written data set as the loaders read it, resumption after a crash, sharding, the CLI."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rewards import FunctionReward
from visalign.config import ConfigError
from visalign.data import load_records
from visalign.models import load_generator
from visalign.synth import SynthConfig, build_synth, parse_reward_spec, parse_shard, reward_agreement, vote_preference

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def test_phi_matches_a_hand_computation():
    # Two rewards, three images. R1 = (3, 1, 2): image 0 beats 1 and 2, image 2 beats 1.
    # R2 = (1, 1, 5): images 0 and 1 tie (no win for either), image 2 beats both.
    # Wins: image 0: 2 + 0, image 1: 0 + 0, image 2: 1 + 2; phi = wins / (n (k - 1)) = wins / 4.
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 5.0]])
    torch.testing.assert_close(vote_preference(scores), torch.tensor([0.5, 0.0, 0.75], dtype=torch.float64))
    # Batched over prompts, and every image equal: nobody wins.
    batched = torch.stack([scores, torch.ones(2, 3)])
    torch.testing.assert_close(vote_preference(batched)[1], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        vote_preference(torch.ones(2, 1))


def test_reward_agreement_counts_pairs_both_rewards_order():
    # One prompt, k = 3, pairs (0,1), (0,2), (1,2). Signs: R1 = (3,1,2): +, +, -; R2 = (2,1,3): +, -, -;
    # R3 = -R1: -, -, +; R4 = (1,1,5): tie, -, -.
    scores = torch.tensor([[[3.0, 1.0, 2.0], [2.0, 1.0, 3.0], [-3.0, -1.0, -2.0], [1.0, 1.0, 5.0]]])
    agreement = reward_agreement(scores)
    assert agreement[0, 1].item() == pytest.approx(2 / 3)  # agree on (0,1) and (1,2)
    assert agreement[0, 2].item() == 0.0 and agreement[0, 0].item() == 1.0
    assert agreement[0, 3].item() == pytest.approx(1 / 2)  # the tie (0,1) is not counted
    torch.testing.assert_close(agreement, agreement.T)
    tied = reward_agreement(torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]))
    assert torch.isnan(tied[0, 1])


def test_shard_and_reward_spec_parsing(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)
    for bad in ("4/4", "x", "1-2"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)
    assert parse_reward_spec("testbed-oracle:mode=quality,quality_weight=0.25") == (
        "testbed-oracle", {"mode": "quality", "quality_weight": 0.25})
    assert parse_reward_spec("hpsv2") == ("hpsv2", {})


# ------------------------------------------------------------------ the data set on tiny models


@pytest.fixture(scope="module")
def generators(tiny_model_dir):
    # Two families (their images even differ in size is allowed); k = 2 generators x 2 images.
    return {"tiny-sd": load_generator(tiny_model_dir("sd")), "tiny-sd3": load_generator(tiny_model_dir("sd3"))}


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def contrast(images, prompts):
    return images.std(dim=(1, 2, 3))


REWARDS = {"redness": FunctionReward(redness), "brightness": FunctionReward(brightness),
           "contrast": FunctionReward(contrast)}


def synth_config(tmp_path, out, **overrides):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    values = dict(generators=["tiny-sd", "tiny-sd3"], rewards=list(REWARDS), prompts=str(prompts),
                  images_per_generator=2, steps=2, batch_size=3, prompts_per_part=1, progress=False, out=str(out))
    values.update(overrides)
    return SynthConfig(**values)


def run(config, generators, **kwargs):
    return build_synth(config, generators=generators, rewards=REWARDS, **kwargs)


def rows_of(out):
    return sorted((row for path in sorted(Path(out).glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()),
                  key=lambda row: row["prompt_index"])


@pytest.fixture(scope="module")
def straight(generators, tmp_path_factory):
    """One uninterrupted run: the reference the interrupted and sharded runs must reproduce."""
    tmp = tmp_path_factory.mktemp("synth-straight")
    summary = run(synth_config(tmp, tmp / "out"), generators)
    return tmp / "out", summary


def test_written_phi_matches_a_hand_computation_from_the_stored_rewards(straight):
    out, summary = straight
    rows = rows_of(out)
    assert [row["prompt"] for row in rows] == PROMPTS
    for row in rows:
        k, n = len(row["images"]), len(REWARDS)
        assert k == 4 and all(len(r) == n for r in row["rewards"])
        for i in range(k):  # phi_i = strict wins over all rewards and other images / (n (k - 1))
            wins = sum(row["rewards"][i][v] > row["rewards"][j][v] for v in range(n) for j in range(k) if j != i)
            assert row["scores"][i] == pytest.approx(wins / (n * (k - 1)))
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert sorted(row["generators"]) == ["tiny-sd", "tiny-sd", "tiny-sd3", "tiny-sd3"]


def test_stored_rewards_are_the_rewards_of_the_saved_images(straight):
    out, _ = straight
    row = rows_of(out)[1]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(out / name))).permute(2, 0, 1).float() / 255
                          for name in row["images"]])
    for v, reward in enumerate(REWARDS.values()):
        stored = torch.tensor([r[v] for r in row["rewards"]])
        torch.testing.assert_close(reward(pixels, [row["prompt"]] * 4).float(), stored, atol=3e-3, rtol=0)


def test_loaders_read_the_data_set_as_rankings_and_as_pairs(straight):
    out, summary = straight
    rankings = load_records("parquet", out)
    assert rankings.kind == "ranking" and len(rankings) == 3
    record = rankings[0]
    rows = rows_of(out)
    assert record.scores == rows[0]["scores"] and all(Path(p).is_file() for p in record.images)
    pairs = load_records("parquet", out, as_pairs=True)
    expected = sum(a > b for row in rows for a in row["scores"] for b in row["scores"])
    assert pairs.kind == "pair" and len(pairs) == expected == summary["ordered_pairs"]
    for index in range(len(pairs)):
        pair = pairs[index]
        assert pair.label == 1.0
    assert set(summary["reward_agreement"]) == {"redness vs brightness", "redness vs contrast",
                                                "brightness vs contrast"}
    assert summary["this_run"]["images"] == 12 and summary["this_run"]["images_per_s"] > 0


def test_resume_after_a_crash_neither_duplicates_nor_loses(straight, generators, tmp_path, monkeypatch):
    reference, _ = straight
    out = tmp_path / "out"
    config = synth_config(tmp_path, out)
    run(config, generators, stop_after_parts=1)  # prompt 0 written, then "stopped"
    first_part = out / "part-0000000-0000000.parquet"
    written = first_part.read_bytes()
    # A crash in the middle of the next part: its images are on disk, the part file is not.
    import visalign.synth as synth

    real_write = synth._write_part
    monkeypatch.setattr(synth, "_write_part", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(config, generators)
    monkeypatch.setattr(synth, "_write_part", real_write)
    assert len(list(out.glob("part-*.parquet"))) == 1 and (out / "images" / "0000001_g0_0.png").is_file()
    summary = run(config, generators)
    assert summary["this_run"]["prompts_skipped_as_done"] == 1 and summary["this_run"]["images"] == 8
    assert first_part.read_bytes() == written  # what was written survives untouched
    resumed, straight_rows = rows_of(out), rows_of(reference)
    assert [row["prompt_index"] for row in resumed] == [0, 1, 2]  # each prompt once
    for a, b in zip(resumed, straight_rows):
        assert a["scores"] == b["scores"] and a["rewards"] == b["rewards"] and a["images"] == b["images"]
    for name in straight_rows[2]["images"]:  # same noise, same images
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    # A further run has nothing to do.
    assert run(config, generators)["this_run"]["images"] == 0


def test_shards_split_the_prompts_and_together_make_the_straight_data_set(straight, generators, tmp_path):
    reference, _ = straight
    out = tmp_path / "out"
    counts = [run(synth_config(tmp_path, out, shard=f"{i}/2", prompts_per_part=2), generators)["this_run"]["images"]
              for i in (0, 1)]
    assert counts == [8, 4]  # prompts 0, 2 and prompt 1
    assert json.loads((out / "summary-1of2.json").read_text())["prompts"] == 3
    sharded, straight_rows = rows_of(out), rows_of(reference)
    assert [row["prompt_index"] for row in sharded] == [0, 1, 2]
    assert [row["scores"] for row in sharded] == [row["scores"] for row in straight_rows]


def test_resume_with_other_settings_is_refused(straight, generators, tmp_path):
    out, _ = straight
    with pytest.raises(ConfigError, match="steps"):
        run(synth_config(tmp_path, out, steps=3), generators)
    with pytest.raises(ConfigError, match="k = "):
        run(synth_config(tmp_path, tmp_path / "one", generators=["tiny-sd"], images_per_generator=1),
            {"tiny-sd": generators["tiny-sd"]})


def test_cli_writes_a_data_set_with_named_rewards(tiny_model_dir, tmp_path):
    from visalign.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "dataset", "synth", f"generators=[{tiny_model_dir('sd')}]", "images_per_generator=2", f"prompts={prompts}",
        "rewards=[testbed-oracle, 'testbed-oracle:mode=quality']", "steps=2", "progress=false", f"out={out}"])
    assert result.exit_code == 0, result.output
    assert "2 ranked prompts, 4 images" in result.output
    assert len(load_records("parquet", out)) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_names"] == ["testbed-oracle", "testbed-oracle:mode=quality"]
