"""Diffusion-DRO (ALGORITHMS.md §10): the hinge ranking loss, gradients, the lagged policy, the
replay buffer's alignment, and a trainer run on winners only."""

import json
import math

import pytest
import torch
from PIL import Image

from visalign.algorithms.dro import DiffusionDRO, DROOptions, dro_loss
from visalign.config import ConfigError
from visalign.models import load_generator

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
FAST = dict(num_inference_steps=4, prompt_dropout=0.0)


def caption_batch(generator, count=3, seed=0):
    size = generator.default_resolution
    g = torch.Generator().manual_seed(seed)
    return {"prompts": PROMPTS[:count], "images": torch.rand(count, 3, size, size, generator=g)}


def rng(seed=123):
    return torch.Generator().manual_seed(seed)


def perturb(parameters, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ the loss as a function


def test_loss_hand_values_and_never_negative():
    l_e, r_e, l_p, r_p = torch.tensor([0.30, 0.30, 0.30]), torch.tensor([0.40, 0.30, 0.30]), \
        torch.tensor([0.20, 0.20, 0.20]), torch.tensor([0.10, 0.20, 0.2005])
    # diff = (l_e - r_e) - (l_p - r_p) = [-0.2, 0, +0.0005]
    torch.testing.assert_close(dro_loss(l_e, r_e, l_p, r_p, 1e-3), torch.tensor([0.0, 1e-3, 1.5e-3]))
    g = torch.Generator().manual_seed(0)
    values = [torch.rand(1000, generator=g) for _ in range(4)]
    assert (dro_loss(*values, 1e-3) >= 0).all()


def test_gradient_is_the_diff_gradient_below_the_hinge_and_zero_beyond_it():
    margin = 1e-3
    l_e, r_e, l_p, r_p = (torch.tensor([v], requires_grad=True) for v in (0.5, 0.5, 0.2, 0.2))
    loss = dro_loss(l_e, r_e, l_p, r_p, margin).sum()
    assert loss.item() == pytest.approx(margin)
    grads = torch.autograd.grad(loss, (l_e, r_e, l_p, r_p))
    assert [g.item() for g in grads] == [1.0, -1.0, -1.0, 1.0]
    # The ranking holds by the margin: loss 0 and no gradient at all.
    l_e = torch.tensor([0.5 - 2 * margin], requires_grad=True)
    loss = dro_loss(l_e, r_e, l_p, r_p, margin).sum()
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(loss, (l_e, r_e, l_p, r_p)))


# ------------------------------------------------------------------ the objective on tiny models


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_loss_equals_the_margin_at_initialisation_with_a_nonzero_gradient(tiny_model_dir, family):
    generator = load_generator(tiny_model_dir(family))
    trainable = generator.add_lora(rank=2)  # theta = reference = lagged
    objective = DiffusionDRO(generator, DROOptions(**FAST))
    objective.setup()
    objective.before_step(None, 0)
    loss, metrics = objective.loss(caption_batch(generator), rng())
    assert loss.item() == pytest.approx(1e-3, abs=1e-7) and metrics["diff"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["mse_sample"] < 1e-10  # the target of a policy sample is the lagged model's own prediction
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_zero_loss_and_zero_gradient_when_the_ranking_holds_by_the_margin(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    trainable = generator.add_lora(rank=2)
    # margin 0 at initialisation: diff = 0 <= -margin, the ranking holds.
    objective = DiffusionDRO(generator, DROOptions(margin=0.0, **FAST))
    objective.before_step(None, 0)
    loss, _ = objective.loss(caption_batch(generator), rng())
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_no_gradient_reaches_the_reference_or_the_lagged_policy(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    generator.enable_full_finetuning(snapshot_reference=True)
    objective = DiffusionDRO(generator, DROOptions(**FAST))
    objective.before_step(None, 0)
    perturb(generator.denoiser.parameters(), 1e-3)  # theta moves away from both
    loss, metrics = objective.loss(caption_batch(generator), rng())
    loss.backward()
    assert metrics["mse_sample"] > 0 and loss.item() > 0
    for frozen in (generator._reference_module, objective.lagged_module):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.denoiser.parameters())


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_buffer_keeps_latent_timestep_and_prediction_aligned(tiny_model_dir, family):
    generator = load_generator(tiny_model_dir(family))
    generator.add_lora(rank=2)
    objective = DiffusionDRO(generator, DROOptions(**FAST))
    objective.setup()
    experts = torch.randn(generator.latent_shape(2))
    entry = objective.fill_buffer(PROMPTS[:2], experts, rng(), 32, 32)
    steps = FAST["num_inference_steps"]
    assert entry["latents"].shape == (2, steps, *experts.shape[1:]) and entry["predictions"].shape == entry["latents"].shape
    torch.testing.assert_close(entry["experts"], experts)
    grid, next_grid = generator.sampling_timesteps(steps)
    if family == "sd":  # one random offset in [0, T/N) added to the grid
        offset = entry["timesteps"] - grid
        assert (offset == offset[0]).all() and 0 <= offset[0] < 1000 // steps
        next_grid = next_grid + offset[0]
    else:
        torch.testing.assert_close(entry["timesteps"], grid)
    cond = generator.encode_prompt(PROMPTS[:2])
    with torch.no_grad():
        for k in range(steps):
            x_t, t = entry["latents"][:, k], entry["timesteps"][k]
            out = objective.lagged.predict(x_t, t, cond)
            torch.testing.assert_close(out, entry["predictions"][:, k])  # the prediction AT the stored latent
            if k + 1 < steps:
                following = generator.step(x_t, t, next_grid[k], out).prev_sample
                torch.testing.assert_close(following, entry["latents"][:, k + 1])
    # Draws keep each latent with its own timestep, prediction, prompt and expert.
    for seed in range(3):
        objective.fill_buffer(PROMPTS[1:3], torch.randn(generator.latent_shape(2)), rng(7 + seed), 32, 32)
    assert len(objective.buffer) == 4
    drawn = objective.draw(16, rng(1))
    for i in range(16):
        matches = [(b, j, k) for b, e in enumerate(objective.buffer) for j in range(2) for k in range(steps)
                   if torch.equal(e["latents"][j, k], drawn["latents"][i])]
        assert matches
        b, j, k = matches[0]
        entry = objective.buffer[b]
        assert torch.equal(entry["predictions"][j, k], drawn["predictions"][i])
        assert torch.equal(entry["timesteps"][k], drawn["timesteps"][i])
        assert torch.equal(entry["experts"][j], drawn["experts"][i]) and entry["prompts"][j] == drawn["prompts"][i]
    objective.fill_buffer(PROMPTS[:2], experts, rng(8), 32, 32)
    assert len(objective.buffer) == 4  # the last buffer_batches batches


def test_lagged_policy_refreshes_every_n_steps_only(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sd"))
    trainable = generator.add_lora(rank=2)
    names = [n for n, p in generator.denoiser.named_parameters() if p.requires_grad]
    objective = DiffusionDRO(generator, DROOptions(refresh_every=3, **FAST))

    def lagged_equals_policy():
        lagged = dict(objective.lagged_module.named_parameters())
        policy = dict(generator.denoiser.named_parameters())
        return all(torch.equal(lagged[n], policy[n]) for n in names)

    history = []
    for step in range(7):
        objective.before_step(None, step)
        history.append(lagged_equals_policy())
        perturb(trainable, 0.01, seed=step)
    assert history == [True, False, False, True, False, False, True]
    state = objective.state_dict()
    fresh = DiffusionDRO(generator, DROOptions(refresh_every=3, **FAST))
    fresh.load_state_dict(state)
    assert fresh.lagged_step == 6
    for name, value in dict(fresh.lagged_module.named_parameters()).items():
        torch.testing.assert_close(value, dict(objective.lagged_module.named_parameters())[name])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="margin"):
        DiffusionDRO(None, DROOptions(margin=-1.0))
    with pytest.raises(ConfigError, match="refresh_every"):
        DiffusionDRO(None, DROOptions(refresh_every=0))


def test_trainer_runs_dro_on_the_winners_of_pairs(tiny_model_dir, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from visalign.config import load_config
    from visalign.training import TrainConfig, train

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
        return buffer.getvalue()

    rows = {"caption": ["a red square", "a blue square"] * 3, "jpg_0": [png((220, 30, 30)), png((30, 30, 220))] * 3,
            "jpg_1": [png((30, 200, 30))] * 6, "label_0": [1.0] * 6}
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "data" / "train.parquet")
    config = load_config(TrainConfig, overrides=[
        f"model.path={tiny_model_dir('sd')}", f"data.path={tmp_path / 'data'}", "data.format=pickapic", f"output_dir={tmp_path / 'run'}",
        "objective=dro", "batch_size=2", "log_every=1", "optim.lr=1e-2", "max_steps=4", "data.random_flip=false",
        "options={refresh_every: 2, num_inference_steps: 3, buffer_batches: 2}", "checkpoint_every=2",
    ])
    result = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(1e-3, abs=1e-6)
    assert [r["lagged_step"] for r in rows] == [0.0, 0.0, 2.0, 2.0]
    assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in rows)
    assert (result.final_weights / "pytorch_lora_weights.safetensors").is_file()
