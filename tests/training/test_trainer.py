"""The one training loop: exact resume, safe checkpoints, DDP on 2 CPU processes, data errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import shape_image, write_captions, write_pickapic

from visalign.algorithms.common import per_sample_mse
from visalign.config import ConfigError, load_config
from visalign.models import load_generator
from visalign.training import TrainConfig, Trainer, TrainingError, list_checkpoints, train

HERE = Path(__file__).parent


def make_config(model, data, out, *overrides):
    return load_config(TrainConfig, overrides=[
        f"model.path={model}", f"data.path={data}", f"output_dir={out}", "batch_size=4", "log_every=1",
        "optim.lr=1e-3", "checkpoint_every=0", *overrides,
    ])


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return write_captions(tmp_path_factory.mktemp("captions"), 24)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "pytorch_lora_weights.safetensors"))


def test_resume_repeats_the_straight_run_exactly(tiny_model_dir, captions, tmp_path):
    model = tiny_model_dir("sd")
    common = ["max_steps=6", "gradient_accumulation_steps=2", "optim.lr_scheduler=cosine", "optim.warmup_steps=2",
              "ema.enabled=true", "ema.decay=0.9"]
    straight = train(make_config(model, captions, tmp_path / "straight", *common))
    assert straight.step == 6

    # The same run killed during step 5 (after the checkpoint of step 3), then resumed.
    from visalign.algorithms.sft import SFT

    class Killed(SFT):
        def loss(self, batch, rng):
            if trainer.step == 4:
                raise KeyboardInterrupt("killed")
            return super().loss(batch, rng)

    trainer = Trainer(make_config(model, captions, tmp_path / "resumed", *common, "checkpoint_every=3"))
    trainer.setup()
    trainer.objective = Killed(trainer.generator, trainer.objective.options)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["checkpoint-3"]
    assert _metrics(tmp_path / "resumed")[-1]["step"] == 4  # logged past the checkpoint: dropped on resume
    resumed = train(make_config(model, captions, tmp_path / "resumed", *common, "resume=latest"))
    assert resumed.step == 6

    a, b = _weights(tmp_path / "straight" / "lora"), _weights(tmp_path / "resumed" / "lora")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    losses_a = [(m["step"], m["loss"]) for m in _metrics(tmp_path / "straight")]
    losses_b = [(m["step"], m["loss"]) for m in _metrics(tmp_path / "resumed")]
    assert [s for s, _ in losses_b] == [1, 2, 3, 4, 5, 6]
    for (_, la), (_, lb) in zip(losses_a, losses_b):
        assert la == pytest.approx(lb, rel=1e-5)


def test_a_crash_while_writing_a_checkpoint_leaves_nothing_resume_would_load(tiny_model_dir, captions, tmp_path,
                                                                            monkeypatch):
    model = tiny_model_dir("sd")
    out = tmp_path / "run"
    train(make_config(model, captions, out, "max_steps=2", "checkpoint_every=1"))
    good = list_checkpoints(out / "checkpoints")
    assert [p.name for p in good] == ["checkpoint-1", "checkpoint-2"]

    import visalign.training.checkpoint as checkpoint

    real_save = checkpoint.torch.save

    def dying_save(obj, path, *args, **kwargs):
        if "lr_scheduler" in str(path):  # optimizer written, then the process "dies"
            raise KeyboardInterrupt("killed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(model, captions, out, "max_steps=3", "checkpoint_every=1", "resume=latest"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)

    leftovers = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(name.startswith(".checkpoint-3.tmp") for name in leftovers)  # the half-written one
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]
    # A half-written folder under the final name (e.g. copied by hand) is refused by completeness too.
    broken = out / "checkpoints" / "checkpoint-9"
    broken.mkdir()
    (broken / "weights.safetensors").write_bytes(b"")
    assert list_checkpoints(out / "checkpoints")[-1].name == "checkpoint-2"
    result = train(make_config(model, captions, out, "max_steps=3", "resume=latest"))
    assert result.step == 3 and _metrics(out)[-1]["step"] == 3


def test_sft_lowers_the_denoising_loss_on_held_out_images(tiny_model_dir, tmp_path):
    model = tiny_model_dir("sd")
    data = write_captions(tmp_path / "train", 48, seed=0)
    held_out = [shape_image(c, 90_000 + i) for i, c in enumerate(["red", "green", "blue"] * 4)]
    prompts = [f"a {c} square" for c in ["red", "green", "blue"] * 4]
    images = torch.stack([torch.from_numpy(__import__("numpy").array(im)).permute(2, 0, 1).float() / 255 for im in held_out])

    def held_out_loss(generator):
        rng = torch.Generator().manual_seed(0)
        with torch.no_grad():
            latents = generator.encode(images, sample=False)
            total = 0.0
            for _ in range(4):
                noise = torch.randn(latents.shape, generator=rng)
                t = generator.sample_timesteps(len(images), generator=rng)
                out = generator.predict(generator.add_noise(latents, noise, t), t, generator.encode_prompt(prompts))
                total += per_sample_mse(out, generator.target(latents, noise, t)).mean().item()
        return total / 4

    before = held_out_loss(load_generator(model))
    result = train(make_config(model, data, tmp_path / "run", "max_steps=40", "batch_size=8", "model.finetune=full",
                               "optim.lr=2e-3", "data.random_flip=false"))
    after = held_out_loss(load_generator(result.final_weights))
    assert after < 0.8 * before, (before, after)


def test_lora_run_output_loads_in_a_plain_pipeline_and_changes_it(tiny_model_dir, captions, tmp_path):
    import diffusers

    model = tiny_model_dir("sd")
    result = train(make_config(model, captions, tmp_path / "run", "max_steps=3", "optim.lr=5e-2"))
    assert result.final_weights == tmp_path / "run" / "lora"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, height=32, width=32, output_type="pt")
    base = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(result.final_weights)
    tuned = pipe("a red square", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (tuned - base).abs().max() > 1e-3
    saved = load_config(TrainConfig, tmp_path / "run" / "config.yaml")
    assert saved.max_steps == 3 and saved.model.path == str(model)



def test_a_single_file_model_trains_offline_with_single_file_config(tiny_model_dir, sd_single_file, captions, tmp_path):
    path, config = sd_single_file
    trainer = Trainer(make_config(path, captions, tmp_path / "run", f"model.single_file_config={config}", "max_steps=1"))
    result = trainer.train()
    assert result.step == 1 and result.final_weights == tmp_path / "run" / "lora"
    # The frozen weights are the file's, which are the folder's.
    ours, theirs = trainer.generator.vae.state_dict(), load_generator(tiny_model_dir("sd")).vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml").model.single_file_config == str(config)

def test_pickapic_parquet_with_a_corrupt_image_trains_and_counts_it(tiny_model_dir, tmp_path):
    data = write_pickapic(tmp_path / "train.parquet", 12, corrupt_rows={5})
    result = train(make_config(tiny_model_dir("sd"), data, tmp_path / "run", "data.format=pickapic", "max_steps=3"))
    assert result.step == 3 and result.skipped_records == 1
    assert _metrics(tmp_path / "run")[-1]["skipped_records"] == 1


def test_misspelt_field_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown field 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(TrainConfig, overrides=["model.path=x", "optim.lrr=1"])
    config = load_config(TrainConfig, overrides=["model.path=/nonexistent", "options={betta: 1}"])
    with pytest.raises(ConfigError, match="unknown field 'betta'"):
        from visalign.training import build_objective

        build_objective(config.objective, None, config.options)


def test_cli_train_rejects_a_misspelt_field(tmp_path):
    from click.testing import CliRunner

    from visalign.cli import main

    result = CliRunner().invoke(main, ["train", "model.path=x", "max_stpes=3"])
    assert result.exit_code == 2 and "did you mean 'max_steps'" in result.output
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    assert "optim.lr: float = 0.0001" in help_text and "model.lora.rank: int = 4" in help_text


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_weights(tiny_model_dir, captions, tmp_path):
    from visalign.algorithms.sft import SFT

    class Exploding(SFT):
        def loss(self, batch, rng):
            loss, metrics = super().loss(batch, rng)
            return (loss * float("nan") if trainer.step == 2 else loss), metrics

    config = make_config(tiny_model_dir("sd"), captions, tmp_path / "run", "max_steps=5")
    trainer = Trainer(config)
    trainer.setup()
    trainer.objective = Exploding(trainer.generator, trainer.objective.options)
    with pytest.raises(TrainingError, match=r"loss is nan at step 2.*saved in .*checkpoint-2"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.parameters)

    config = make_config(tiny_model_dir("sd"), captions, tmp_path / "skip", "max_steps=4", "on_nan=skip")
    trainer = Trainer(config)
    trainer.setup()
    trainer.objective = Exploding(trainer.generator, trainer.objective.options)
    assert trainer.train().step == 4
    assert any(m.get("nan_skipped") for m in _metrics(tmp_path / "skip"))


def test_objective_and_data_kind_mismatch_is_named(tiny_model_dir, captions, tmp_path):
    config = make_config(tiny_model_dir("sd"), captions, tmp_path / "run", "objective=nope")
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        Trainer(config).setup()


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_cpu_processes_synchronise_gradients_and_shard_the_data(tiny_model_dir, captions, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(HERE)}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(HERE / "ddp_worker.py"),
               str(tiny_model_dir("sd")), captions, str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # identical after 3 synchronised updates
    seen0, seen1 = set(ranks[0]["seen"]), set(ranks[1]["seen"])
    assert len(ranks[0]["seen"]) == 6 and not seen0 & seen1  # different records on each rank
    assert ranks[0]["lora_b_norm"] > 0  # the synchronised updates were applied


def test_latent_cache_skips_the_encoders_after_the_first_epoch(tiny_model_dir, captions, tmp_path):
    config = make_config(tiny_model_dir("sd"), captions, tmp_path / "run", "max_steps=12", "data.random_flip=false",
                         f"data.cache_dir={tmp_path / 'cache'}", "options={prompt_dropout: 0.3}")
    trainer = Trainer(config)
    trainer.setup()
    calls = {"vae": 0, "text": 0}
    vae_encode, encode_prompt = trainer.generator.vae.encode, trainer.generator.encode_prompt

    def counting_vae(*args, **kwargs):
        calls["vae"] += 1
        return vae_encode(*args, **kwargs)

    def counting_prompt(*args, **kwargs):
        calls["text"] += 1
        return encode_prompt(*args, **kwargs)

    trainer.generator.vae.encode = counting_vae
    trainer.generator.encode_prompt = counting_prompt
    result = trainer.train()  # 24 records / batch 4 = 6 steps per epoch: 2 epochs
    assert result.step == 12
    assert calls["vae"] == 6  # first epoch only
    assert trainer.cache.hits == 24 and trainer.cache.misses == 24
    with pytest.raises(Exception, match="random"):
        Trainer(make_config(tiny_model_dir("sd"), captions, tmp_path / "r2", f"data.cache_dir={tmp_path / 'c2'}")).setup()


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_train_text_encoder_updates_and_saves_every_text_encoder(tiny_model_dir, captions, tmp_path, family):
    from safetensors.torch import load_file

    model = tiny_model_dir(family)
    result = train(make_config(model, captions, tmp_path / "run", "max_steps=2", "model.finetune=full",
                               "model.train_text_encoder=true", "objective=sft"))
    saved = result.final_weights
    encoders = [p.parent.name for p in Path(model).glob("text_encoder*/model.safetensors")]
    assert encoders
    for component in encoders:
        before = load_file(str(Path(model) / component / "model.safetensors"))
        after = load_file(str(saved / component / "model.safetensors"))
        changed = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
        assert len(changed) > len(before) // 2, component  # the encoder was trained, not just copied


def test_train_text_encoder_is_refused_where_it_would_be_wrong(tiny_model_dir, captions, tmp_path):
    model = tiny_model_dir("sd")
    with pytest.raises(ConfigError, match="finetune=full"):
        Trainer(make_config(model, captions, tmp_path / "a", "model.train_text_encoder=true")).setup()
    with pytest.raises(ConfigError, match="cache_dir"):
        Trainer(make_config(model, captions, tmp_path / "b", "model.train_text_encoder=true", "model.finetune=full",
                            f"data.cache_dir={tmp_path / 'cache'}", "data.random_flip=false")).setup()
