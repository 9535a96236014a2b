"""PPD (ALGORITHMS.md §9): the user branch starts equal to the base, the loss starts at ln 2,
only the new layers learn, and swapping users changes only the user branch."""

import copy
import math

import pytest
import torch

from visalign.algorithms.ppd import (
    PPD,
    PPDOptions,
    UserAttnProcessor,
    add_user_branch,
    fit_user_branch,
    load_user_branch,
    ppd_loss,
    sample_personal,
    save_user_branch,
    set_user_scale,
    user_branch_has_timestep_path,
    user_branch_is_odd,
    user_branch_parameters,
    with_user,
)
from visalign.models import load_generator

USER_DIM = 8
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def users(n, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, USER_DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


def pair_batch(generator, pairs=3, seed=0):
    size = generator.default_resolution
    g = torch.Generator().manual_seed(seed)
    return {"prompts": PROMPTS[:pairs], "winner": torch.rand(pairs, 3, size, size, generator=g),
            "loser": torch.rand(pairs, 3, size, size, generator=g), "user_embeds": users(pairs, seed)}


@pytest.fixture(scope="module")
def loaded_sd(tiny_model_dir):
    return load_generator(tiny_model_dir("sd"))


@pytest.fixture
def sd(loaded_sd):
    return copy.deepcopy(loaded_sd)  # each test installs its own branch; loading costs seconds


def denoise(generator, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(generator.latent_shape(len(cond)), generator=g)
    with torch.no_grad():
        return generator.predict(x_t, torch.full((len(cond),), 500), cond)


def perturb_user_values(generator, std=0.5):
    """Move every W_v' off zero, so the user branch changes the output."""
    with torch.no_grad():
        for name, p in generator.denoiser.named_parameters():
            if "to_v_user" in name:
                p.normal_(0, std)


def test_zero_initialised_branch_equals_base(sd):
    cond = sd.encode_prompt(PROMPTS)
    base = denoise(sd, cond)
    add_user_branch(sd, USER_DIM)
    assert torch.equal(denoise(sd, cond), base)  # no user: the base path, bit for bit
    personal = denoise(sd, with_user(cond, users(3)))
    assert torch.allclose(personal, base, atol=1e-6)  # W_v' = 0: the user branch adds exactly 0
    # once W_v' moves, the user branch changes the output, and a zero user still gives the base
    perturb_user_values(sd)
    assert (denoise(sd, with_user(cond, users(3))) - base).abs().max() > 1e-3
    assert torch.allclose(denoise(sd, with_user(cond, torch.zeros(3, USER_DIM))), base, atol=1e-6)
    set_user_scale(sd, 0.0)
    assert torch.equal(denoise(sd, with_user(cond, users(3))), base)


def test_user_embeds_without_branch_is_an_error(sd):
    with pytest.raises(ValueError, match="no PPD user branch"):
        denoise(sd, with_user(sd.encode_prompt(PROMPTS), users(3)))


def test_initial_loss_is_ln2_and_only_new_parameters_get_gradients(sd):
    new = add_user_branch(sd, USER_DIM)
    objective = PPD(sd, PPDOptions(user_dropout=0.0))
    loss, metrics = objective.loss(pair_batch(sd), torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["implicit_accuracy"] == pytest.approx(0.5)
    loss.backward()
    new_ids = {id(p) for p in new}
    for name, p in sd.denoiser.named_parameters():
        if id(p) not in new_ids:
            assert p.grad is None, name
    # W_v' is zero, so only W_v' receives gradient at the first step (K and the projection sit
    # behind V = 0); every W_v' gets some.
    grads = {name: p.grad for name, p in sd.denoiser.named_parameters() if id(p) in new_ids}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "to_v_user" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "to_v_user" not in n)
    for encoder in sd.text_encoders.values():
        assert all(p.grad is None for p in encoder.parameters())


def test_sft_weight_adds_the_winners_denoising_loss_under_their_user(sd):
    """loss = PPD loss + w * (winner MSE with the user); at the zero branch that is ln 2 + w * base MSE."""
    add_user_branch(sd, USER_DIM)
    batch = pair_batch(sd)
    plain, metrics = PPD(sd, PPDOptions(user_dropout=0.0)).loss(batch, torch.Generator().manual_seed(1))
    weighted, _ = PPD(sd, PPDOptions(user_dropout=0.0, sft_weight=3.0)).loss(batch, torch.Generator().manual_seed(1))
    assert weighted.item() == pytest.approx(plain.item() + 3.0 * metrics["mse_winner"], rel=1e-5)
    # the winner term's gradient, too, reaches only the branch
    weighted.backward()
    new_ids = {id(p) for p in user_branch_parameters(sd)}
    assert all(p.grad is None for p in sd.denoiser.parameters() if id(p) not in new_ids)
    with pytest.raises(Exception, match="sft_weight must be >= 0"):
        PPD(sd, PPDOptions(sft_weight=-1.0))


def test_error_space_sample_measures_the_errors_in_x0(sd):
    """At one timestep the x0 errors are the native (epsilon) errors times (1 - abar) / abar."""
    add_user_branch(sd, USER_DIM)
    perturb_user_values(sd)
    sd.sample_timesteps = lambda n, generator=None: torch.full((n,), 800)
    batch = pair_batch(sd)
    native = PPD(sd, PPDOptions(user_dropout=0.0)).loss(batch, torch.Generator().manual_seed(1))[1]
    x0 = PPD(sd, PPDOptions(user_dropout=0.0, error_space="sample")).loss(batch, torch.Generator().manual_seed(1))[1]
    weight = (1 - sd.alphas_cumprod[800]) / sd.alphas_cumprod[800]
    assert weight > 10
    for key in ("mse_winner", "mse_loser"):
        assert x0[key] == pytest.approx(native[key] * weight.item(), rel=1e-4), key
    assert x0["margin"] == pytest.approx(native["margin"] * weight.item(), rel=1e-3)
    with pytest.raises(Exception, match="error_space must be one of"):
        PPD(sd, PPDOptions(error_space="x0"))


def test_swapping_users_changes_only_the_user_branch(sd):
    add_user_branch(sd, USER_DIM)
    perturb_user_values(sd)
    # Record each cross-attention's text branch (the base processor's output).
    texts = {}
    for name, processor in sd.denoiser.attn_processors.items():
        if isinstance(processor, UserAttnProcessor):
            base = processor.base_processor

            def text_branch(*args, _base=base, _name=name, **kwargs):
                out = _base(*args, **kwargs)
                texts.setdefault(_name, []).append(out)
                return out

            processor.base_processor = text_branch

    cond = sd.encode_prompt(PROMPTS[:1])
    outputs = [denoise(sd, with_user(cond, user[None])) for user in users(2)]
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4
    # The first cross-attention sees the same input for both users: its text branch is identical.
    first = next(iter(texts))
    assert torch.equal(texts[first][0], texts[first][1])
    # Interpolating users gives intermediate outputs (the conditioning is continuous).
    middle = denoise(sd, with_user(cond, torch.nn.functional.normalize(users(2).mean(0), dim=0)[None]))
    assert (middle - outputs[0]).abs().max() < (outputs[1] - outputs[0]).abs().max()


def record_user_terms(generator):
    """From now on, append each cross-attention's user term (its output minus its text branch) to
    the returned ``{layer: [term, ...]}``, one entry per denoiser call."""
    terms = {}
    for name, processor in generator.denoiser.attn_processors.items():
        if isinstance(processor, UserAttnProcessor):
            def record(self, attn, hidden, *args, user_tokens=None, _name=name, **kwargs):
                out = UserAttnProcessor.__call__(self, attn, hidden, *args, user_tokens=user_tokens, **kwargs)
                terms.setdefault(_name, []).append(out - self.base_processor(attn, hidden, *args, **kwargs))
                return out

            processor.__class__ = type("Recording", (UserAttnProcessor,), {"__call__": record})
    return terms


@pytest.mark.parametrize("odd", [False, True])
def test_odd_branch_gives_the_opposite_user_the_opposite_term(sd, odd):
    """``odd=True``: each layer's user term for ``-e`` is minus the term for ``e`` (exactly, for the
    same layer input); the plain branch has an even part too. Both start at the base model."""
    cond = sd.encode_prompt(PROMPTS[:1])
    base = denoise(sd, cond)
    add_user_branch(sd, USER_DIM, odd=odd)
    assert user_branch_is_odd(sd) is odd
    assert torch.allclose(denoise(sd, with_user(cond, users(1))), base, atol=1e-6)  # W_v' = 0
    perturb_user_values(sd)
    e = users(1)
    terms = record_user_terms(sd)
    for x in (e, -e):
        denoise(sd, with_user(cond, x))
    # the first cross-attention sees the same input for e and -e: compare its user terms there
    plus, minus = next(iter(terms.values()))
    assert plus.abs().max() > 1e-3
    even = (plus + minus).abs().max() / (plus - minus).abs().max()
    if odd:
        assert even < 1e-5
    else:
        assert even > 1e-2
    # through the whole (nonlinear) UNet the change is odd to first order only: for a small branch
    perturb_user_values(sd, std=0.01)
    change = [denoise(sd, with_user(cond, x)) - base for x in (e, -e)]
    whole = (change[0] + change[1]).abs().max() / (change[0] - change[1]).abs().max()
    assert (whole < 0.05) if odd else (whole > 0.2)  # measured: 0.02 odd, 0.47 plain


def save_and_reload(objective, loaded_sd, tmp_path):
    """Save ``objective``'s user branch and load it into a fresh copy of the base, which must then
    give the same personal output; returns ``(fresh, metadata, path, cond, expected output)``."""
    path = objective.save_trained(tmp_path)
    cond = objective.generator.encode_prompt(PROMPTS[:2])
    expected = denoise(objective.generator, with_user(cond, users(2)))
    fresh = copy.deepcopy(loaded_sd)
    metadata = load_user_branch(fresh, path)
    assert torch.allclose(denoise(fresh, with_user(cond, users(2))), expected, atol=1e-6)
    return fresh, metadata, path, cond, expected


def test_odd_option_must_match_the_installed_branch_and_survives_save_load(sd, loaded_sd, tmp_path):
    add_user_branch(sd, USER_DIM, odd=True)
    with pytest.raises(Exception, match="options.odd is False but the installed user branch has odd=True"):
        PPD(sd, PPDOptions())
    objective = PPD(sd, PPDOptions(odd=True, user_dropout=0.0))
    perturb_user_values(sd)
    fresh, metadata, _, _, _ = save_and_reload(objective, loaded_sd, tmp_path)
    assert metadata["odd"] is True
    assert user_branch_is_odd(fresh)
    # PPD installs an odd branch itself when the UNet has none
    other = copy.deepcopy(loaded_sd)
    from safetensors.torch import save_file

    table = tmp_path / "users.safetensors"
    save_file({"alice": users(1)[0]}, str(table))
    PPD(other, PPDOptions(odd=True, user_embeddings=str(table)))
    assert user_branch_is_odd(other)


def record_time_embedding(generator):
    """Append the UNet's timestep embedding (after the user's shift) to the returned list, per call."""
    seen = []
    generator.denoiser.time_embedding.register_forward_hook(lambda module, args, output: seen.append(output))
    return seen


def test_timestep_path_shifts_the_timestep_embedding_by_a_linear_odd_term(sd):
    """``timestep_path=True``: temb + s * e W_t; zero at start, zero for the zero user, -e gets the
    opposite shift, the scale scales it, and the first PPD step trains it (and nothing of the base)."""
    cond = sd.encode_prompt(PROMPTS[:2])
    base = denoise(sd, cond)
    new = add_user_branch(sd, USER_DIM, timestep_path=True)
    assert user_branch_has_timestep_path(sd) and not user_branch_is_odd(sd)
    assert torch.equal(denoise(sd, cond), base)
    assert torch.allclose(denoise(sd, with_user(cond, users(2))), base, atol=1e-6)  # W_t = 0, W_v' = 0
    loss, _ = PPD(sd, PPDOptions(user_dropout=0.0, timestep_path=True)).loss(pair_batch(sd, 2),
                                                                             torch.Generator().manual_seed(1))
    loss.backward()
    path_weight = sd.denoiser.user_timestep.proj.weight
    assert any(p is path_weight for p in new)
    assert path_weight.grad is not None and path_weight.grad.abs().sum() > 0
    new_ids = {id(p) for p in new}
    assert all(p.grad is None for p in sd.denoiser.parameters() if id(p) not in new_ids)
    # no graph tensor is left on the UNet after a forward with a user (EMA and reference copies deep-copy it)
    sd.predict(torch.randn(sd.latent_shape(2)), torch.full((2,), 500), with_user(cond, users(2))).sum().backward()
    copy.deepcopy(sd.denoiser)

    with torch.no_grad():
        path_weight.normal_(0, 0.1)
    seen = record_time_embedding(sd)
    e = users(2)
    denoise(sd, cond)
    denoise(sd, with_user(cond, e))
    denoise(sd, with_user(cond, -e))
    denoise(sd, with_user(cond, torch.zeros(2, USER_DIM)))
    plain, plus, minus, zero = seen
    shift = e @ path_weight.detach().T
    assert torch.allclose(plus - plain, shift, atol=1e-5) and shift.abs().max() > 1e-2
    assert torch.allclose(minus - plain, -shift, atol=1e-5)
    assert torch.equal(zero, plain)
    assert (denoise(sd, with_user(cond, e)) - base).abs().max() > 1e-3  # the shift reaches the output
    set_user_scale(sd, 0.5)
    denoise(sd, with_user(cond, e))
    assert torch.allclose(seen[-1] - plain, 0.5 * shift, atol=1e-5)
    set_user_scale(sd, 0.0)
    assert torch.equal(denoise(sd, with_user(cond, e)), base)


def test_timestep_path_survives_save_load_and_must_match(sd, loaded_sd, tmp_path):
    add_user_branch(sd, USER_DIM, timestep_path=True)
    with pytest.raises(Exception, match="options.timestep_path is False but the installed user branch has "
                                        "timestep_path=True"):
        PPD(sd, PPDOptions())
    objective = PPD(sd, PPDOptions(timestep_path=True, user_dropout=0.0))
    perturb_user_values(sd)
    with torch.no_grad():
        sd.denoiser.user_timestep.proj.weight.normal_(0, 0.1)
    fresh, metadata, path, cond, expected = save_and_reload(objective, loaded_sd, tmp_path)
    assert metadata["timestep_path"] is True
    assert user_branch_has_timestep_path(fresh)
    # a copy of the loaded model carries the path (the hooks hold no reference to the original)
    copied = copy.deepcopy(fresh)
    assert torch.allclose(denoise(copied, with_user(cond, users(2))), expected, atol=1e-6)
    # a branch without the path cannot take the file's weights
    plain = copy.deepcopy(loaded_sd)
    add_user_branch(plain, USER_DIM)
    with pytest.raises(ValueError, match="saved with the timestep path"):
        load_user_branch(plain, path)


def test_ppd_loss_matches_hand_values():
    policy_w, policy_l = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    reference_w, reference_l = torch.tensor([0.20, 0.20]), torch.tensor([0.20, 0.20])
    loss, z = ppd_loss(policy_w, policy_l, reference_w, reference_l, beta=10.0)
    expected_z = torch.tensor([-5.0 * (0.10 - 0.30), -5.0 * (0.20 - 0.10)])
    assert torch.allclose(z, expected_z)
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(expected_z))


def test_training_moves_only_the_branch_and_save_load_round_trips(sd, loaded_sd, tmp_path):
    base_state = {k: v.clone() for k, v in sd.denoiser.state_dict().items()}
    add_user_branch(sd, USER_DIM)
    objective = PPD(sd, PPDOptions(beta=500.0, user_dropout=0.5))
    history = fit_user_branch(objective, [pair_batch(sd, seed=s) for s in range(2)], steps=4, lr=1e-2)
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)
    state = sd.denoiser.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # the base is untouched
    path = save_user_branch(sd, tmp_path / "ppd.safetensors", {"users": 2})
    cond = sd.encode_prompt(PROMPTS[:2])
    expected = denoise(sd, with_user(cond, users(2)))
    fresh = copy.deepcopy(loaded_sd)
    assert load_user_branch(fresh, path) == {"users": 2}
    assert torch.allclose(denoise(fresh, with_user(cond, users(2))), expected, atol=1e-6)
    assert all(not p.requires_grad for p in user_branch_parameters(fresh))


def test_sample_personal_with_guidance_and_lookup_by_user_id(sd, tmp_path):
    from safetensors.torch import save_file

    add_user_branch(sd, USER_DIM)
    images = sample_personal(sd, PROMPTS[:2], users(1)[0], num_inference_steps=2, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0)).images
    plain = sd.sample(PROMPTS[:2], num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(images, plain, atol=1e-5)  # untrained branch: the base model's images
    table = tmp_path / "users.safetensors"
    save_file({"alice": users(1)[0], "bob": users(1, 1)[0]}, str(table))
    objective = PPD(sd, PPDOptions(user_embeddings=str(table)))
    batch = pair_batch(sd, pairs=2)
    del batch["user_embeds"]
    batch["user_ids"] = ["bob", "alice"]
    assert torch.equal(objective.user_embeds(batch)[0], users(1, 1)[0])
    batch["user_ids"] = ["carol", "alice"]
    with pytest.raises(KeyError, match="carol"):
        objective.user_embeds(batch)


def test_sd3_is_refused_with_a_clear_message():
    from types import SimpleNamespace

    generator = SimpleNamespace(family="sd3", denoiser_name="transformer")  # what add_user_branch reads
    with pytest.raises(ValueError, match="steering route"):
        add_user_branch(generator, USER_DIM)


def test_sdxl_user_branch_starts_at_base_and_responds_to_users(tiny_model_dir):
    generator = load_generator(tiny_model_dir("sdxl"))
    cond = generator.encode_prompt(PROMPTS[:2])
    base = denoise(generator, cond)
    add_user_branch(generator, USER_DIM)
    assert torch.allclose(denoise(generator, with_user(cond, users(2))), base, atol=1e-6)
    perturb_user_values(generator)
    assert (denoise(generator, with_user(cond, users(2))) - base).abs().max() > 1e-3


def _pair_dataset(tmp_path, pairs=6):
    """A jsonl pair dataset labelled by two users, and their embeddings table."""
    import json

    from PIL import Image
    from safetensors.torch import save_file

    rows = []
    for i in range(pairs):
        for side in ("w", "l"):
            colour = (200, 40, 40) if side == "w" else (40, 40, 200)
            Image.new("RGB", (32, 32), colour).save(tmp_path / f"{side}{i}.png")
        rows.append({"prompt": PROMPTS[i % 3], "winner": f"w{i}.png", "loser": f"l{i}.png",
                     "user_id": ["alice", "bob"][i % 2]})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = tmp_path / "users.safetensors"
    save_file({"alice": users(1)[0], "bob": users(1, 1)[0]}, str(table))
    return tmp_path / "pairs.jsonl", table


def _ppd_config(model_dir, data, table, out, **overrides):
    from visalign.config import load_config
    from visalign.training import TrainConfig

    values = {
        "model": {"path": str(model_dir)}, "objective": "ppd",
        "options": {"beta": 500.0, "user_dropout": 0.0, "user_embeddings": str(table)},
        "data": {"format": "jsonl", "path": str(data), "random_flip": False},
        "optim": {"lr": 1e-2, "weight_decay": 0.0}, "batch_size": 2, "max_steps": 8, "log_every": 1,
        "checkpoint_every": 4, "output_dir": str(out), "seed": 0,
    }
    for key, value in overrides.items():
        values[key] = value
    return load_config(TrainConfig, data=values)


def test_visalign_train_runs_ppd_on_the_user_branch_only(tiny_model_dir, loaded_sd, tmp_path):
    import json

    from visalign.training import train

    data, table = _pair_dataset(tmp_path)
    base_state = {k: v.clone() for k, v in loaded_sd.denoiser.state_dict().items()}
    trained = copy.deepcopy(loaded_sd)
    result = train(_ppd_config(tiny_model_dir("sd"), data, table, tmp_path / "run"), generator=trained)
    assert result.step == 8 and result.final_weights == tmp_path / "run" / "user_branch.safetensors"
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the branch starts at the base
    assert not (tmp_path / "run" / "lora").exists() and not (tmp_path / "run" / "model").exists()
    # a fresh base model + the saved branch: the base weights were never touched, the branch learned
    fresh = copy.deepcopy(loaded_sd)
    assert load_user_branch(fresh, result.final_weights)["objective"] == "ppd"
    state = fresh.denoiser.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert any(p.abs().max() > 0 for name, p in fresh.denoiser.named_parameters() if "to_v_user" in name)
    # the saved branch is the trained one: same personal predictions as the run's own generator
    cond = with_user(fresh.encode_prompt(PROMPTS[:2]), users(2))
    assert torch.allclose(denoise(fresh, cond), denoise(trained, cond), atol=1e-6)
    assert (denoise(fresh, cond) - denoise(fresh, with_user(cond, None))).abs().max() > 1e-4


def test_visalign_train_ppd_resumes_and_refuses_full_finetuning(tiny_model_dir, tmp_path):
    from visalign.config import ConfigError
    from visalign.training import train

    data, table = _pair_dataset(tmp_path)
    straight = train(_ppd_config(tiny_model_dir("sd"), data, table, tmp_path / "straight"))
    train(_ppd_config(tiny_model_dir("sd"), data, table, tmp_path / "resumed", max_steps=4))
    resumed = train(_ppd_config(tiny_model_dir("sd"), data, table, tmp_path / "resumed", resume="latest"))
    assert resumed.step == 8
    from safetensors.torch import load_file

    a, b = load_file(str(straight.final_weights)), load_file(str(resumed.final_weights))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ConfigError, match="trains its own new layers"):
        train(_ppd_config(tiny_model_dir("sd"), data, table, tmp_path / "full", model={"path": str(tiny_model_dir("sd")),
                                                                                       "finetune": "full"}))


def test_visalign_train_ppd_with_lora_saves_both(tiny_model_dir, tmp_path):
    from visalign.training import train

    data, table = _pair_dataset(tmp_path)
    config = _ppd_config(tiny_model_dir("sd"), data, table, tmp_path / "run", max_steps=2, checkpoint_every=0,
                         options={"beta": 500.0, "user_embeddings": str(table), "train_lora": True})
    result = train(config)
    assert result.final_weights.name == "user_branch.safetensors"
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
