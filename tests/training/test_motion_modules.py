"""``model.finetune=motion_modules``: AnimateDiff's training through the shared trainer (only the
temporal layers learn; a frozen copy is the reference; the result is a MotionAdapter folder)."""

import pytest
import torch

from visalign.config import ConfigError, load_config
from visalign.data import TensorPairs
from visalign.models import load_generator
from visalign.training import TrainConfig, train


def _config(path, out, **model):
    return load_config(TrainConfig, data={
        "model": {"path": str(path), "finetune": "motion_modules", **model}, "objective": "dpo",
        "options": {"beta": 100.0, "sft_weight": 1.0}, "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "batch_size": 2, "max_steps": 3, "checkpoint_every": 0, "log_every": 1, "output_dir": str(out), "seed": 0,
    })


def _pairs(frames=4, size=32, n=4):
    g = torch.Generator().manual_seed(0)
    winners, losers = torch.rand(2, n, frames, 3, size, size, generator=g)
    return TensorPairs(winners, losers, [f"a red circle moving left {i}" for i in range(n)])


def _images(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    winners, losers = torch.rand(2, n, 3, size, size, generator=g)
    return TensorPairs(winners, losers, [f"a red circle {i}" for i in range(n)])


def test_trainer_trains_only_the_motion_modules_and_saves_a_motion_adapter(tiny_model_dir, tmp_path):
    from diffusers import MotionAdapter

    folder = tiny_model_dir("animatediff")
    gen = load_generator(folder, num_frames=4, height=32, width=32)
    before = {name: p.detach().clone() for name, p in gen.denoiser.named_parameters()}
    result = train(_config(folder, tmp_path / "run"), generator=gen, dataset=_pairs())
    assert result.step == 3
    changed = {name for name, p in gen.denoiser.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("motion_modules" in name for name in changed)
    assert any(name.startswith("down_blocks") for name in changed) and any(name.startswith("up_blocks") for name in changed)

    # The reference is the model before training: a fresh load predicts what it predicts.
    fresh = load_generator(folder, num_frames=4, height=32, width=32)
    x = torch.randn(fresh.latent_shape(2), generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([500, 300]), fresh.encode_prompt(["a", "b"])
    torch.testing.assert_close(gen.reference().predict(x, t, cond), fresh.predict(x, t, cond))
    assert not torch.allclose(gen.predict(x, t, cond), fresh.predict(x, t, cond))

    # The final save is a MotionAdapter holding the trained temporal weights.
    assert result.final_weights == tmp_path / "run" / "motion_adapter"
    adapter = MotionAdapter.from_pretrained(result.final_weights)
    saved = dict(adapter.named_parameters())
    trained = {name: p for name, p in gen.denoiser.named_parameters() if "motion_modules" in name}
    assert set(saved) == set(trained)
    for name in changed:
        torch.testing.assert_close(saved[name].detach(), trained[name].detach())



def test_the_reference_copies_only_the_motion_modules(tiny_model_dir):
    """The frozen SD layers are shared with the policy (the same tensors: no second UNet in
    memory); the motion modules are the reference's own, frozen, and stay put while the policy's
    move."""
    gen = load_generator(tiny_model_dir("animatediff"), num_frames=4, height=32, width=32)
    trainable = gen.enable_motion_module_training()
    with gen.reference()._reference_denoiser() as frozen:
        reference = dict(frozen.named_parameters())
    policy = dict(gen.denoiser.named_parameters())
    assert set(reference) == set(policy)
    motion = [n for n in policy if "motion_modules" in n]
    assert motion and len(motion) < len(policy)
    for name, param in policy.items():
        if "motion_modules" in name:
            assert reference[name] is not param and reference[name].data_ptr() != param.data_ptr()
            assert param.requires_grad and not reference[name].requires_grad
            torch.testing.assert_close(reference[name], param)
        else:
            assert reference[name] is param and not param.requires_grad
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1)
    assert all(not torch.equal(reference[n], policy[n]) for n in motion)

def test_motion_modules_needs_an_animatediff_model(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="motion_modules trains an AnimateDiff model's motion modules; this 'sd' model"):
        train(_config(tiny_model_dir("sd"), tmp_path / "run"), dataset=_images())
    with pytest.raises(ConfigError, match="model.finetune must be 'lora', 'full' or 'motion_modules', got 'temporal'"):
        train(_config(tiny_model_dir("animatediff"), tmp_path / "run", finetune="temporal"), dataset=_pairs())
