"""visalign.personal: user embeddings from choices (save/load/interpolate) and the two routes
behind one API and the CLI."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from visalign.algorithms.ppd import add_user_branch, save_user_branch
from visalign.models import load_generator
from visalign.personal import (
    Personaliser,
    PixelEncoder,
    embed_user,
    interpolate_users,
    load_encoder,
    load_user,
    save_user,
)
from visalign.testbed.users import draw_choices, get_user, taste_features


def images(n, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pixel_encoder_embeds_and_ranks_a_dark_lover_right():
    encoder = load_encoder("testbed")
    assert isinstance(encoder, PixelEncoder) and encoder.embed_dim == 48
    batch = images(12)
    batch[:6] *= 0.3  # six dark images
    embeddings = encoder.embed_images(batch)
    assert embeddings.shape == (12, 48)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(12))
    # a user who picked the darker image four times prefers dark images
    user = embed_user(encoder, batch[:4], batch[6:10])
    scores = encoder.embed_images(batch) @ user
    assert scores[:6].min() > scores[6:].max()


def test_embedding_needs_four_choices_and_round_trips(tmp_path):
    encoder = load_encoder("testbed")
    with pytest.raises(ValueError, match="at least 4"):
        embed_user(encoder, images(3), images(3, 1))
    user = embed_user(encoder, images(4), images(4, 1))
    path = save_user(tmp_path / "user.pt", user, encoder, choices=4)
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"user_embedding"}  # a plain tensor file
    loaded, metadata = load_user(path)
    assert torch.equal(loaded, user) and metadata == {"encoder": "testbed", "choices": 4}


def test_interpolation_between_users():
    a, b = torch.nn.functional.normalize(torch.randn(2, 48), dim=-1)
    assert torch.allclose(interpolate_users(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(interpolate_users(a, b, 1.0), b, atol=1e-6)
    middle = interpolate_users(a, b, 0.5)
    assert middle.norm() == pytest.approx(1.0, abs=1e-5)
    assert (middle @ a).item() == pytest.approx((middle @ b).item(), abs=1e-5)


def test_synthetic_user_choices_give_an_embedding_that_agrees_with_their_taste():
    from visalign.testbed.render import sample_scene, render_batch
    import numpy as np

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(48)]
    batch = render_batch(scenes, 32)
    user = get_user("night_owl")
    choices = draw_choices(user, batch[:16], 4, rng=1, temperature=0)
    encoder = load_encoder("testbed")
    embedding = embed_user(encoder, batch[[c for c, _ in choices]], batch[[r for _, r in choices]])
    scores, utility = encoder.embed_images(batch[16:]) @ embedding, user.utility(batch[16:])
    agree = ((scores[:, None] - scores[None]) * (utility[:, None] - utility[None]) > 0).float().mean() * 32 / 31
    assert agree > 0.6  # pairwise agreement with the ground truth on unseen images (0.5 = chance)


@pytest.fixture(scope="module")
def sd(tiny_model_dir):
    return load_generator(tiny_model_dir("sd"))


@pytest.fixture
def personaliser(sd, tmp_path):
    generator = copy.deepcopy(sd)
    encoder = load_encoder("testbed")
    add_user_branch(generator, encoder.embed_dim)
    with torch.no_grad():
        for name, p in generator.denoiser.named_parameters():
            if "to_v_user" in name:
                p.normal_(0, 0.5)
    path = save_user_branch(generator, tmp_path / "branch.safetensors")
    return Personaliser(copy.deepcopy(sd), encoder, ppd=path, particles=2)


def test_routes_at_strength_zero_are_the_base_model(sd, personaliser):
    user = torch.nn.functional.normalize(torch.randn(48), dim=0)
    kwargs = dict(num_images_per_prompt=2, seed=3, num_inference_steps=3, guidance_scale=3.0)
    plain = sd.sample(["a red circle"] * 2, num_inference_steps=3, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(3)).images
    for route in ("steer", "ppd"):
        base = personaliser.generate("a red circle", user, route=route, strength=0.0, **kwargs)
        assert torch.allclose(base, plain, atol=1e-5), route
    personal = personaliser.generate("a red circle", user, route="ppd", strength=1.0, **kwargs)
    assert (personal - plain).abs().max() > 1e-3
    steered = personaliser.generate("a red circle", user, route="steer", strength=1.0, **kwargs)
    assert steered.shape == plain.shape


def test_errors_name_what_is_wrong(sd, personaliser):
    with pytest.raises(ValueError, match=r"\[48\] tensor"):
        personaliser.generate("a red circle", torch.randn(10))
    with pytest.raises(ValueError, match="route"):
        personaliser.generate("a red circle", torch.randn(48), route="magic")
    steer_only = Personaliser(copy.deepcopy(sd), load_encoder("testbed"))
    assert steer_only.routes == ("steer",)
    with pytest.raises(ValueError, match="needs a trained PPD user branch"):
        steer_only.generate("a red circle", torch.randn(48), route="ppd")


def test_testbed_ppd_config_refuses_an_unknown_embedding_pool_or_error_space():
    from visalign.personal import TestbedPPDConfig as PersonalConfig  # not named Test*: pytest would collect it

    assert PersonalConfig(train_embed="choice").train_embed == "choice"
    with pytest.raises(ValueError, match="train_embed must be 'pool' or 'choice'"):
        PersonalConfig(train_embed="demo")
    assert PersonalConfig(error_space="sample").error_space == "sample"
    with pytest.raises(ValueError, match="error_space must be"):
        PersonalConfig(error_space="x0")


def test_cli_sample_with_a_user_file(tiny_model_dir, personaliser, tmp_path):
    from visalign.cli import main

    user = save_user(tmp_path / "user.pt", torch.nn.functional.normalize(torch.randn(48), dim=0), "testbed")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir("sd")), "--prompts", "a red circle",
                                       "--user", str(user), "--route", "ppd", "--ppd", str(personaliser.ppd_path),
                                       "--num_images_per_prompt", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("personal_reward" in r for r in records)
    assert (out / "grid.png").is_file()
    result = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir("sd")), "--prompts", "a red circle",
                                       "--user", str(user), "--route", "ppd", "--out", str(out)])
    assert result.exit_code != 0 and "route=ppd needs ppd=PATH" in result.output


def test_personal_efficacy_script_trains_saves_and_evaluates_a_saved_branch(benchmark_script, tmp_path, monkeypatch):
    """The efficacy script end to end at toy size: train + save, then ``load=`` evaluates the saved
    branch at two strengths (the figures of RESULTS.md come from this code at full size)."""
    script = benchmark_script("efficacy_personal")
    # a large lr, so two steps move the branch enough to change the images (else a branch that
    # failed to load would reproduce them too)
    tiny = ["train_prompts=2", "per_prompt=2", "train_users=3", "pairs_per_user=1", "steps=2", "batch_size=2",
            "heldout_users=1", "heldout_prompts=2", "sample_steps=2", "lr=0.5"]
    branch = tmp_path / "branch.safetensors"
    monkeypatch.setattr("sys.argv", ["efficacy_personal", *tiny, f"out={tmp_path / 'train'}", f"save={branch}",
                                     "train_embed=choice", "error_space=sample", "odd=true"])
    script.main()
    trained = json.loads((tmp_path / "train" / "report.json").read_text())
    assert branch.is_file()
    assert abs(trained["summary"]["train"]["first_loss"] - 0.6931) < 1e-3
    assert trained["config"]["error_space"] == "sample" and trained["config"]["odd"] is True
    assert len(trained["per_user"]) == 4 + 1
    assert any(abs(delta) > 1e-3 for row in trained["per_user"] for delta in row["ppd_taste_delta"].values())

    monkeypatch.setattr("sys.argv", ["efficacy_personal", *tiny, f"out={tmp_path / 'load'}", f"load={branch}",
                                     "strengths=[0.5,1.0]"])
    script.main()
    loaded = json.loads((tmp_path / "load" / "report.json").read_text())
    assert loaded["summary"]["train"] is None and "pool_s" not in loaded["timings_s"]
    row = loaded["per_user"][0]
    assert {"ppd_win_rate", "ppd_x0.5_win_rate", "ppd_x0.5_oracle"} <= set(row)
    # the same branch (odd, from the file's metadata), users and noise at strength 1: the same
    # images as when it was trained
    assert row["ppd_utility"] == pytest.approx(trained["per_user"][0]["ppd_utility"], abs=1e-4)
    assert row["best_of_4_win_rate"] == trained["per_user"][0]["best_of_4_win_rate"]


@pytest.mark.parametrize("mode", ["ppd", "dpo"])
def test_single_taste_probe_end_to_end(benchmark_script, mode, tmp_path):
    """The session-13 diagnostic (benchmarks/probe_single_taste.py) at toy size: pairs by one
    user, a few steps with a large lr, taste changes measured against the base model."""
    script = benchmark_script("probe_single_taste")
    tiny = ["--mode", mode, "--train-prompts", "3", "--per-prompt", "3", "--min-gap", "0", "--steps", "2",
            "--batch-size", "2", "--heldout-prompts", "2", "--sample-steps", "2", "--eval-every", "2", "--lr", "0.5",
            "--error-space", "sample", "--beta", "100", "--sft-weight", "25", "--out", str(tmp_path / "probe.json")]
    report = script.main(tiny)
    assert report["pairs"] > 0 and report["mean_gap"] >= 0
    (row,) = report["curve"]
    assert row["step"] == 2 and len(row["delta_cfg5"]) == 4
    assert ("delta_cfg5_user_in_negative" in row) == (mode == "ppd")
    assert any(abs(v) > 1e-4 for v in row["delta_cfg5"] + row["delta_cfg1"])  # training moved the images
    with pytest.raises(SystemExit, match="no pair of the pool differs"):
        script.main([*tiny[:6], "--min-gap", "2"])
