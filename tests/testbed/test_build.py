"""`visalign testbed build quick=true` end to end, evaluation, RAFT and the quickstart job."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from visalign.cli import main
from visalign.testbed.build import BuildConfig, build


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("testbed")
    summary = build(BuildConfig(quick=True, families=["sd", "sd3"], out=str(out / "assets"), work_dir=str(out / "work")))
    return out, summary


def test_quick_build_writes_loadable_models_and_figures(quick_build):
    import diffusers

    out, summary = quick_build
    assert json.loads((out / "assets" / "build.json").read_text())["models"].keys() == {"sd", "sd3"}
    for family in ("sd", "sd3"):
        figures = summary["models"][family]
        assert 0.0 <= figures["heldout_accuracy"] <= 1.0 and 0.0 <= figures["heldout_geneval_score"] <= 1.0 and set(figures["per_category"]) >= {"single_object"}
        assert set(figures["recall"]) == {"colour", "shape", "colour_shape"}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out / "assets" / "sd", torch_dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained VAE's latent statistics
    generator = __import__("visalign.models", fromlist=["load_generator"]).load_generator(out / "assets" / "sd")
    assert generator.pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_quick_build_trains_both_learned_rewards_that_load_by_path(quick_build):
    import rewards

    out, summary = quick_build
    assert set(summary["rewards"]) == {"hpsv2", "clip"}
    assert 0.0 <= summary["rewards"]["hpsv2"]["heldout_rendered"]["agreement"] <= 1.0
    for folder, name in (("reward", "hpsv2"), ("clip", "clip")):
        reward = rewards.load(str(out / "assets" / folder))
        assert reward.name == name
        scores = reward(torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"])
        assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_rendered_captions_are_imperfect_exactly_where_marked(quick_build):
    from visalign.testbed.build import _load_images
    from visalign.testbed.oracle import oracle

    out, _ = quick_build
    captions = out / "work" / "data" / "captions.jsonl"
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    verdict = oracle(_load_images(captions, len(rows)), [row["caption"] for row in rows])
    marked = torch.tensor([row["caption_matches"] for row in rows])
    assert torch.equal(verdict.correct, marked)
    assert 0.1 < 1 - marked.float().mean() < 0.5  # caption_noise = 0.3


def test_evaluate_reports_zero_drift_against_itself(quick_build):
    from visalign.eval import evaluate, write_report
    from visalign.models import load_generator

    out, _ = quick_build
    generator = load_generator(out / "assets" / "sd")
    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow square"]
    report = evaluate(generator, prompts, images_per_prompt=2, num_inference_steps=2, base=generator)
    assert report.drift == 0.0 and report.diversity > 0 and report.num_images == 6
    path = write_report({"model": report}, out / "report", images_per_prompt=2)
    assert "| model |" in path.read_text() and (out / "report" / "per_category.png").exists()
    assert set(report.recall) == {"colour", "shape", "colour_shape"} and all(0 <= v <= 1 for v in report.recall.values())
    assert "| model | colour | shape | colour_shape |" in path.read_text()


def test_raft_keeps_the_best_candidate_of_each_prompt(quick_build):
    from visalign.config import load_config
    from visalign.training import TrainConfig, Trainer

    out, _ = quick_build
    config = load_config(TrainConfig, data={
        "model": {"path": str(out / "assets" / "sd")}, "objective": "raft", "batch_size": 4, "max_steps": 2,
        "output_dir": str(out / "raft"), "checkpoint_every": 0,
        "options": {"prompts_per_refresh": 4, "num_candidates": 3, "num_inference_steps": 2},
    })
    trainer = Trainer(config)
    trainer.setup()
    trainer.objective.reward = _quality_reward()
    result = trainer.train()
    objective = trainer.objective
    assert result.step == 2 and len(objective.latents) == 4
    assert objective.kept_reward >= objective.sample_reward  # best of n is at least the mean
    assert (result.final_weights / "pytorch_lora_weights.safetensors").exists()


def _quality_reward():
    from visalign.testbed.oracle import OracleReward

    return OracleReward(mode="quality")


def test_quickstart_runs_end_to_end(quick_build, tmp_path):
    out, _ = quick_build
    result = CliRunner().invoke(main, [
        "quickstart", f"model={out / 'assets' / 'sd'}", "reward=testbed-oracle", "min_reward=null", "steps=2", "eval_prompts=3",
        "images_per_prompt=1", f"out={tmp_path / 'quick'}",
    ])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "quick" / "report.md").read_text()
    assert "| base |" in report and "| raft |" in report


def test_a_continued_build_trains_on_from_the_previous_models_and_keeps_its_record(quick_build):
    import safetensors.torch

    out, first = quick_build
    before = json.loads((out / "assets" / "build.json").read_text())
    weights = out / "assets" / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    old = safetensors.torch.load_file(weights)
    config = BuildConfig(quick=True, families=["sd"], init_from=str(out / "assets"), out=str(out / "assets"),
                         work_dir=str(out / "work"), reward_family=None)
    summary = build(config)
    record = json.loads((out / "assets" / "build.json").read_text())
    assert record == summary
    assert record["models"]["sd"]["built_with"]["init_from"] == str(out / "assets")
    assert record["models"]["sd3"] == before["models"]["sd3"] and record["rewards"] == before["rewards"]
    assert [run["config"]["init_from"] for run in record["builds"]] == [None, str(out / "assets")]
    assert record["timings"] == summary["timings"] and "vae_s" not in record["timings"]  # the previous VAE is kept
    new = safetensors.torch.load_file(weights)
    # Continued from the previous weights: moved by four small steps, not re-initialised.
    drift = max((new[k].float() - old[k].float()).abs().max().item() for k in old)
    fresh = _fresh_unet_distance(out, old)
    assert 0 < drift < fresh


def test_a_build_sized_in_minutes_probes_the_step_rate_and_records_the_steps_it_chose(quick_build, tmp_path):
    from visalign.testbed import build as build_module

    out, _ = quick_build
    assets = tmp_path / "assets"
    shutil.copytree(out / "assets", assets)
    work = tmp_path / "work"
    config = BuildConfig(quick=True, families=["sd"], init_from=str(assets), out=str(assets), work_dir=str(work),
                         reward_family=None, denoiser_minutes=0.2)
    built_with = build(config)["models"]["sd"]["built_with"]
    rate, steps = built_with["steps_per_second"], built_with["denoiser_steps"]
    assert rate > 0 and steps == max(build_module.PROBE_STEPS[1], int(rate * 0.2 * 60))
    run = work / "sd-continue-run"
    logged = [json.loads(line)["step"] for line in open(run / "logs" / "metrics.jsonl")]
    assert logged[-1] == steps  # the real run trained the steps it recorded
    assert not (work / "sd-continue-run-probe").exists()  # the probe's weights are discarded
    with pytest.raises(ValueError, match="denoiser_minutes"):
        build(BuildConfig(quick=True, families=["sd"], init_from=str(assets), out=str(assets),
                          work_dir=str(work), reward_family=None, denoiser_minutes=0))


def test_a_build_can_switch_the_sd_model_to_v_prediction_at_zero_terminal_snr(quick_build, tmp_path):
    from diffusers import StableDiffusionPipeline

    from visalign.models import load_generator

    out, _ = quick_build
    assets = tmp_path / "assets"
    shutil.copytree(out / "assets", assets)
    config = BuildConfig(quick=True, families=["sd"], init_from=str(assets), out=str(assets),
                         work_dir=str(tmp_path / "work"), reward_family=None, sd_prediction="v_prediction",
                         zero_terminal_snr=True)
    built_with = build(config)["models"]["sd"]["built_with"]
    assert built_with["schedule"] == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                      "timestep_spacing": "trailing"}
    scheduler = json.loads((assets / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    generator = load_generator(assets / "sd")
    # Zero terminal SNR: the last training timestep is pure noise, and sampling starts there.
    assert generator.alphas_cumprod[-1] == 0 and generator.alphas_cumprod[-2] > 0
    assert generator.sampling_timesteps(4)[0].tolist() == [999, 749, 499, 249]
    images = generator.sample(["a red circle"], num_inference_steps=4).images
    assert torch.isfinite(images).all()
    plain = StableDiffusionPipeline.from_pretrained(assets / "sd", safety_checker=None, requires_safety_checker=False)
    assert plain.scheduler.config.timestep_spacing == "trailing"
    assert json.loads((out / "assets" / "sd" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


def test_a_zero_terminal_snr_schedule_without_v_prediction_is_refused_before_any_work(tmp_path):
    from visalign.testbed.build import sd_schedule

    assert sd_schedule(BuildConfig()) == {}
    with pytest.raises(ValueError, match="v_prediction"):
        build(BuildConfig(quick=True, families=["sd"], zero_terminal_snr=True, out=str(tmp_path / "out"),
                          work_dir=str(tmp_path / "work"), reward_family=None))
    with pytest.raises(ValueError, match="sd_prediction"):
        sd_schedule(BuildConfig(sd_prediction="sample"))
    assert not (tmp_path / "work").exists()


def _fresh_unet_distance(out, old):
    """How far a freshly initialised testbed UNet is from ``old`` (the scale a restart would move)."""
    from visalign.models.tiny import build_tiny_components

    unet = build_tiny_components("sd", seed=1, size="testbed")["unet"]
    state = unet.state_dict()
    return max((state[k].float() - old[k].float()).abs().max().item() for k in old)


def test_a_wide_build_ships_wider_denoisers_on_a_compact_vocabulary_in_small_folders(tmp_path):
    from visalign.models import load_generator
    from visalign.models.tiny import WIDE_NUM_MERGES
    from visalign.models.tokenizer import clip_vocab_size

    out = tmp_path / "assets"
    build(BuildConfig(quick=True, families=["sd", "sd3"], size="testbed-wide", out=str(out), work_dir=str(tmp_path / "work"),
                      reward_family=None))
    vocabulary = clip_vocab_size(WIDE_NUM_MERGES)
    for family, denoiser, encoders in (("sd", "unet", ["text_encoder"]), ("sd3", "transformer", ["text_encoder", "text_encoder_2"])):
        folder = out / family
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 12.5e6  # the testbed size's are 10-18 MB
        generator = load_generator(folder)
        pipe = generator.pipe
        assert len(pipe.tokenizer) == vocabulary == 8192
        config = getattr(pipe, denoiser).config
        width = config.block_out_channels[0] if family == "sd" else config.num_attention_heads * config.attention_head_dim
        assert width == {"sd": 64, "sd3": 32 * 4}[family]
        for name in encoders:
            encoder = getattr(pipe, name)
            assert encoder.config.vocab_size == vocabulary and encoder.config.eos_token_id == vocabulary - 1
            tokens = pipe.tokenizer(["a red circle", "two blue squares"], padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids
            with torch.no_grad():
                output = encoder(tokens)
            pooled = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
            # Pooled at each prompt's EOS: a wrong EOS id would pool the BOS token, the same for every prompt.
            assert not torch.allclose(pooled[0], pooled[1])
        assert generator.sample(["a red circle"], num_inference_steps=2).images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="size"):
        build(BuildConfig(quick=True, families=["sd"], size="huge", out=str(out), work_dir=str(tmp_path / "work")))


def test_a_build_can_reuse_a_trained_vae_and_refuses_a_folder_without_one(quick_build, tmp_path):
    from safetensors.torch import load_file

    shipped, _ = quick_build
    out = tmp_path / "assets"
    summary = build(BuildConfig(quick=True, families=["sd"], vae_from=str(shipped / "assets" / "sd"), out=str(out),
                                work_dir=str(tmp_path / "work"), reward_family=None))
    assert "vae_s" not in summary["timings"]  # no VAE phase
    weights = "vae/diffusion_pytorch_model.safetensors"
    reused, original = load_file(out / "sd" / weights), load_file(shipped / "assets" / "sd" / weights)
    assert reused.keys() == original.keys() and all(torch.equal(reused[k], original[k]) for k in original)
    with pytest.raises(FileNotFoundError, match="vae_from"):
        build(BuildConfig(quick=True, families=["sd"], vae_from=str(tmp_path / "work"), out=str(tmp_path / "other"),
                          work_dir=str(tmp_path / "work2"), reward_family=None))


def test_continuing_from_a_folder_without_models_is_a_clear_error(tmp_path):
    config = BuildConfig(quick=True, families=["sd"], init_from=str(tmp_path / "nothing"), out=str(tmp_path / "out"),
                         work_dir=str(tmp_path / "work"), reward_family=None)
    with pytest.raises(FileNotFoundError, match="init_from"):
        build(config)


def test_sample_grid_shows_a_models_samples_per_category(quick_build, tmp_path):
    from PIL import Image

    from visalign.testbed.figures import sample_grid
    from visalign.testbed.prompts import CATEGORIES

    out, _ = quick_build
    path = sample_grid(out / "assets" / "sd", tmp_path / "grid.png", per_category=2, num_inference_steps=2)
    width, height = Image.open(path).size
    assert height > width * len(CATEGORIES) / 2 * 0.9  # one row per category, two columns


def test_the_build_trains_a_video_model_on_its_sd_model(quick_build, tmp_path):
    from visalign.testbed.build import build_video_model
    from visalign.testbed.video_model import BUILD_RECORD, load_testbed_video_model

    out, _ = quick_build
    assets = tmp_path / "assets"
    shutil.copytree(out / "assets" / "sd", assets / "sd")
    figures = build_video_model(BuildConfig(quick=True, out=str(assets)), assets)
    record = json.loads((assets / "animatediff" / BUILD_RECORD).read_text())
    assert figures["heldout"] == record["heldout"] and record["heldout"]["clips"] == 4 and figures["steps"] == 2
    generator = load_testbed_video_model(assets / "animatediff", base=assets / "sd")
    assert generator.family == "animatediff" and generator.latent_shape(1) == (1, 4, 8, 16, 16)
    with pytest.raises(FileNotFoundError, match="add sd to families"):
        build_video_model(BuildConfig(quick=True), tmp_path / "empty")
