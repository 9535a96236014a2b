"""On-policy preference data: sample, score, write jsonl views that the data loaders read."""

import json

import pytest
import torch
from click.testing import CliRunner

from rewards.base import FunctionReward
from visalign.data import load_jsonl
from visalign.preference_data import PreferenceDataConfig, build_preference_data, feedback_labels, select_pairs


def test_select_pairs_best_worst_all_and_gap():
    assert select_pairs([0.1, 0.9, 0.5]) == ([(1, 0)], 0)
    assert select_pairs([0.5, 0.5, 0.5]) == ([], 1)  # no preference: skipped, never (0, 1) arbitrarily
    pairs, dropped = select_pairs([0.1, 0.9, 0.5, 0.5], "all", min_gap=0.05)
    assert sorted(pairs) == [(1, 0), (1, 2), (1, 3), (2, 0), (3, 0)] and dropped == 1
    assert feedback_labels([0.1, 0.9, 0.5]) == [False, True, None]
    assert feedback_labels([0.1, 0.9, 0.5, 0.6]) == [False, True, False, True]
    assert feedback_labels([0.1, 0.9], threshold=0.5) == [False, True]


def brightness():
    return FunctionReward(lambda images, prompts: images.float().mean(dim=(1, 2, 3)), name="brightness")


def test_build_writes_data_the_loaders_read_and_orders_by_reward(tiny_model_dir, tmp_path):
    config = PreferenceDataConfig(model=str(tiny_model_dir("sd")), prompts=str(_prompts(tmp_path)), images_per_prompt=3,
                                  steps=2, out=str(tmp_path / "data"), batch_size=4)
    summary = build_preference_data(config, reward=brightness(), progress=False)
    assert summary["prompts"] == 3 and summary["images"] == 9 and summary["pairs"] == 3
    out = tmp_path / "data"
    pairs = load_jsonl(out / "pairs.jsonl")
    rankings = load_jsonl(out / "rankings.jsonl")
    feedback = load_jsonl(out / "feedback.jsonl")
    assert (pairs.kind, rankings.kind, feedback.kind) == ("pair", "ranking", "feedback")
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["winner_reward"] > row["loser_reward"]
        from PIL import Image
        import numpy as np

        mean = lambda name: np.asarray(Image.open(out / name), dtype=np.float32).mean() / 255
        assert mean(row["winner"]) == pytest.approx(row["winner_reward"], abs=2e-3)  # the PNG is what was scored
    assert summary["feedback"]["good"] == summary["feedback"]["bad"] == 3  # above / below each prompt's median


def test_a_constant_reward_gives_no_pairs_and_says_so(tiny_model_dir, tmp_path):
    config = PreferenceDataConfig(model=str(tiny_model_dir("sd")), prompts=str(_prompts(tmp_path)), images_per_prompt=2,
                                  steps=2, out=str(tmp_path / "data"))
    constant = FunctionReward(lambda images, prompts: torch.zeros(len(images)), name="zero")
    summary = build_preference_data(config, reward=constant, progress=False)
    assert summary["pairs"] == 0 and summary["pairs_dropped_small_gap"] == 3


def test_cli_runs_with_a_registered_reward_and_rejects_bad_options(tiny_model_dir, tmp_path):
    from visalign.cli import main

    args = ["preference-data", f"model={tiny_model_dir('sd')}", f"prompts={_prompts(tmp_path)}", "images_per_prompt=2",
            "steps=2", "reward=testbed-oracle", f"out={tmp_path / 'cli'}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "rankings.jsonl").exists() and "rankings" in result.output
    result = CliRunner().invoke(main, args[:-1] + ["pairs=some", f"out={tmp_path / 'bad'}"])
    assert result.exit_code != 0 and "best-worst or all" in result.output


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\ntwo green triangles\n")
    return path


@pytest.mark.parametrize("objective,view", [("dpo", "pairs"), ("kto", "feedback"), ("kto", "pairs"), ("rwr", "rankings")])
def test_each_objective_trains_on_its_view_of_the_data(tiny_model_dir, tmp_path_factory, objective, view):
    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    out = tmp_path_factory.getbasetemp() / "shared-preference-data"
    if not (out / "pairs.jsonl").exists():
        config = PreferenceDataConfig(model=str(tiny_model_dir("sd")), prompts=str(_prompts(tmp_path_factory.mktemp("p"))),
                                      images_per_prompt=3, steps=2, out=str(out))
        build_preference_data(config, reward=brightness(), progress=False)
    run = tmp_path_factory.mktemp(f"{objective}-{view}")
    result = train(load_config(TrainConfig, overrides=[
        f"model.path={tiny_model_dir('sd')}", f"objective={objective}", "data.format=jsonl",
        f"data.path={out / (view + '.jsonl')}", f"output_dir={run}", "batch_size=2", "max_steps=2", "log_every=1",
        "checkpoint_every=0", "optim.lr=1e-3"]))
    metrics = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert (result.final_weights / "pytorch_lora_weights.safetensors").exists()


def test_a_video_model_writes_frame_folders_that_the_trainer_reads_back(tiny_model_dir, tmp_path):
    """Clips are written as folders of PNG frames (lossless: the pixels scored are the pixels
    trained on), and the pairs file trains the video model with no clip-specific settings."""
    import numpy as np
    from PIL import Image

    from visalign.config import load_config
    from visalign.models import load_generator
    from visalign.training import TrainConfig, train

    folder = tiny_model_dir("animatediff")
    generator = load_generator(folder, num_frames=3, height=32, width=32)
    clip_brightness = FunctionReward(lambda clips, prompts: clips.float().mean(dim=(1, 2, 3, 4)),
                                     name="clip-brightness", modality="video")
    config = PreferenceDataConfig(model=str(folder), prompts=str(_prompts(tmp_path)), images_per_prompt=2, steps=2,
                                  out=str(tmp_path / "data"), batch_size=4)
    summary = build_preference_data(config, generator=generator, reward=clip_brightness, progress=False)
    assert summary["pairs"] == 3
    out = tmp_path / "data"
    for row in map(json.loads, (out / "pairs.jsonl").read_text().splitlines()):
        frames = sorted((out / row["winner"]).glob("frame_*.png"))
        assert len(frames) == 3
        pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32) / 255 for f in frames])
        assert pixels.mean() == pytest.approx(row["winner_reward"], abs=2e-3)

    run = tmp_path / "run"
    result = train(load_config(TrainConfig, overrides=[
        f"model.path={folder}", "objective=dpo", "data.format=jsonl", f"data.path={out / 'pairs.jsonl'}",
        "data.random_flip=false", f"output_dir={run}", "batch_size=2", "max_steps=2", "log_every=1",
        "checkpoint_every=0", "optim.lr=1e-3"]), generator=generator)
    assert result.step == 2
    metrics = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
