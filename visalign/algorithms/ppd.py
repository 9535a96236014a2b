"""PPD: Personalized Preference fine-tuning (Dang et al., CVPR 2025, arXiv 2501.06655;
ALGORITHMS.md §9).

A user-conditioned generator. Next to every text cross-attention of the UNet sits a decoupled
user cross-attention in the style of IP-Adapter::

    Z' = softmax(Q K^T / sqrt(d)) V  +  s * softmax(Q K_u^T / sqrt(d)) V_u
    K_u = tokens(e_u) W_k',  V_u = tokens(e_u) W_v',  tokens(e_u) = reshape(e_u W_p)  [B, n, D_text]

``e_u`` is the user embedding ``[B, U]`` (:mod:`visalign.personal`), ``W_p`` a bias-free
projection to ``n`` tokens, ``s`` the branch scale (1 by default; the demo's base↔personal
slider). Only ``W_p``, ``W_k'`` and ``W_v'`` are new and only they train (optionally with LoRA on
the base). ``W_v'`` starts at zero and ``W_k'`` as a copy of the text ``to_k`` (ALGORITHMS.md
allows either), so the user-conditioned model starts *exactly* equal to the base model; and a
zero user embedding (user-embedding dropout, CFG's negative) gives zero tokens, zero ``V_u`` and
exactly the base model, at any point of training.

Loss: user-conditioned Diffusion-DPO (:func:`~visalign.algorithms.dpo.dpo_logits`) where the
policy MSEs use ``f_theta(x_t, c, e_u, t)`` and the reference is the frozen base *without* user
conditioning. Each pair uses the embedding of the user who labelled it. At initialisation the
policy equals the reference, ``z = 0`` and the loss is ``ln 2``.

Odd branch (``odd=True``; an extension, not in the paper): the user attention becomes
``(A(e_u) - A(-e_u)) / 2``, an odd function of the embedding. visalign's user embedding is a
preference *direction* (chosen minus rejected, :func:`visalign.personal.embed_user`), so the user
who makes the opposite choices has the embedding ``-e_u``; the odd branch gives that user the
opposite change and cannot learn a change shared by every user (the even part that DPO's
shared-shift direction otherwise fills, docs/algorithms/dpo.md). Since the projection is linear,
``A(-e_u)`` is the same attention with negated tokens, i.e. with the query negated:
``softmax(-Q K_u^T / sqrt(d)) (-V_u)``, so the odd branch costs one more small attention.

Timestep path (``timestep_path=True``; an extension, not in the paper): besides the tokens, a
bias-free, zero-initialised projection of ``e_u`` is added to the UNet's timestep embedding,
``temb' = temb + s * e_u W_t``, which every ResNet block turns into a per-channel shift of its
features: a global path for tastes that concern the whole image (background brightness, object
size) rather than where the attention looks. It is linear in ``e_u``, so zero for the zero user
(the model is still exactly the base model then) and odd (``-e_u`` gets the opposite shift).

How it plugs in: :func:`add_user_branch` installs the processors and the projection on the
Generator's UNet; the Generator passes ``Cond.user_embeds`` to the UNet as a cross-attention
keyword (``user_embeds``), which a forward pre-hook on the UNet turns into tokens once per call.
A ``Cond`` without ``user_embeds`` runs the base path. UNet families (SD 1.x/2.x, SDXL) only:
SD3's joint attention has no separate text cross-attention to sit beside.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_latents, paired_noising, per_sample_mse, prompt_cond
from .dpo import check_error_space, dpo_logits, dpo_loss_from_logits, pair_metrics

USER_PROJECTION = "user_projection"
USER_TIMESTEP = "user_timestep"
ADAPTER_FORMAT = "visalign-ppd-user-branch"


# ------------------------------------------------------------------------------ the user branch


class UserProjection(nn.Module):
    """``e_u [B, U] -> tokens [B, n, D]``; bias-free, so a zero embedding gives zero tokens."""

    def __init__(self, user_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.user_dim, self.cross_attention_dim, self.num_tokens = user_dim, cross_attention_dim, num_tokens
        self.proj = nn.Linear(user_dim, num_tokens * cross_attention_dim, bias=False)
        # Unit-norm embeddings -> tokens with roughly unit-variance entries, like text states.
        nn.init.normal_(self.proj.weight, std=1.0)

    def forward(self, user_embeds: Tensor) -> Tensor:
        if user_embeds.ndim != 2 or user_embeds.shape[1] != self.user_dim:
            raise ValueError(f"user_embeds must be [B, {self.user_dim}], got {tuple(user_embeds.shape)}")
        tokens = self.proj(user_embeds.to(self.proj.weight.dtype))
        return tokens.view(user_embeds.shape[0], self.num_tokens, self.cross_attention_dim)


class UserTimestepProjection(nn.Module):
    """``e_u [B, U] -> s * e_u W_t [B, T]``, added to the UNet's timestep embedding (``T`` its width).

    Bias-free and zero-initialised: the model starts as the base model and a zero embedding adds
    nothing. The UNet's forward pre-hook computes the shift and hands it to a forward hook on
    ``unet.time_embedding`` (:func:`_timestep_hook`).
    """

    def __init__(self, user_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.user_dim, self.time_embed_dim = user_dim, time_embed_dim
        self.proj = nn.Linear(user_dim, time_embed_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.scale = 1.0

    def forward(self, user_embeds: Tensor) -> Tensor:
        return self.scale * self.proj(user_embeds.to(self.proj.weight.dtype))


class UserAttnProcessor(nn.Module):
    """A cross-attention processor with a decoupled user branch.

    The text branch is the processor that was installed before (SDPA, xformers, ...), called
    unchanged, so without ``user_tokens`` the output is the base output bit for bit. The user
    branch's output is added after the output projection: ``to_out`` is affine, so
    ``to_out(a + b) = to_out(a) + W_out b`` and this equals IP-Adapter's sum before ``to_out``.
    """

    takes_user_tokens = True

    def __init__(self, base_processor: Any, text_to_k: nn.Linear, hidden_size: int, odd: bool = False) -> None:
        super().__init__()
        self.odd = bool(odd)
        self.base_processor = base_processor
        cross_dim = text_to_k.in_features
        self.to_k_user = nn.Linear(cross_dim, hidden_size, bias=False)
        self.to_v_user = nn.Linear(cross_dim, hidden_size, bias=False)
        with torch.no_grad():
            self.to_k_user.weight.copy_(text_to_k.weight)
            self.to_v_user.weight.zero_()
        self.scale = 1.0

    # diffusers filters cross-attention kwargs by the signature of ``__call__``: keep it explicit.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 user_tokens: Tensor | None = None) -> Tensor:
        out = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if user_tokens is None or self.scale == 0:
            return out
        if hidden_states.ndim != 3:
            raise ValueError("the user branch expects token-shaped hidden states [B, N, C]")
        batch, heads = hidden_states.shape[0], attn.heads
        query = attn.to_q(hidden_states)
        tokens = user_tokens.to(query.dtype)
        key, value = self.to_k_user(tokens), self.to_v_user(tokens)
        head_dim = key.shape[-1] // heads
        query, key, value = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
        user = F.scaled_dot_product_attention(query, key, value)
        if self.odd:
            # A(-e) = softmax(-Q K^T) (-V): tokens(-e) = -tokens(e), so (A(e) - A(-e)) / 2 averages
            # the attention of Q and of -Q over the same values
            user = 0.5 * (user + F.scaled_dot_product_attention(-query, key, value))
        user = user.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        user = F.linear(user, attn.to_out[0].weight) / attn.rescale_output_factor
        return out + self.scale * user


class PassThroughProcessor:
    """Self-attention processors receive the UNet's cross-attention kwargs too: drop ``user_tokens``."""

    def __init__(self, base_processor: Any) -> None:
        self.base_processor = base_processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 user_tokens: Tensor | None = None) -> Tensor:
        return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _tokens_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """UNet forward pre-hook: ``cross_attention_kwargs["user_embeds"]`` -> ``["user_tokens"]`` (projected
    once), and the timestep path's shift for this call (``None`` without a user)."""
    extra = kwargs.get("cross_attention_kwargs")
    embeds = None
    if extra and "user_embeds" in extra:
        extra = dict(extra)
        embeds = extra.pop("user_embeds")
        extra["user_tokens"] = None if embeds is None else getattr(module, USER_PROJECTION)(embeds)
        kwargs = {**kwargs, "cross_attention_kwargs": extra}
    path = getattr(module, USER_TIMESTEP, None)
    if path is not None:  # set on every call, so a call without a user never sees the last call's shift
        module.time_embedding._user_shift = None if embeds is None or path.scale == 0 else path(embeds)
    return args, kwargs


def _timestep_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """Forward hook on ``unet.time_embedding``: add the shift :func:`_tokens_hook` computed, and drop
    it, so no graph tensor outlives the call (a module holding one cannot be deep-copied)."""
    shift = getattr(module, "_user_shift", None)
    module._user_shift = None
    return output if shift is None else output + shift.to(output.dtype)


def _add_timestep_path(generator, unet: nn.Module, user_dim: int) -> None:
    time_embedding = getattr(unet, "time_embedding", None)
    linear = getattr(time_embedding, "linear_2", None)
    if not isinstance(linear, nn.Linear):
        raise ValueError("the timestep path needs a diffusers UNet whose time_embedding ends in linear_2")
    path = UserTimestepProjection(user_dim, linear.out_features)
    unet.add_module(USER_TIMESTEP, path.to(device=generator.device, dtype=generator.dtype))
    time_embedding.register_forward_hook(_timestep_hook)


def _unet(generator) -> nn.Module:
    if generator.denoiser_name != "unet":
        raise ValueError(
            f"PPD's decoupled user cross-attention sits beside a UNet's text cross-attention; the "
            f"{generator.family!r} family has a {generator.denoiser_name} (use the steering route for it)"
        )
    return generator.denoiser


def has_user_branch(denoiser: nn.Module) -> bool:
    return isinstance(getattr(getattr(denoiser, "module", denoiser), USER_PROJECTION, None), UserProjection)


def add_user_branch(generator, user_dim: int, num_tokens: int = 4, seed: int = 0,
                    odd: bool = False, timestep_path: bool = False) -> list[nn.Parameter]:
    """Install the user branch on ``generator``'s UNet (frozen base); return its new parameters.

    The projection is drawn from ``seed``; ``W_k'`` copies the text key projection and ``W_v'`` is
    zero, so the model's output is unchanged until training moves ``W_v'``. ``odd=True`` makes the
    branch an odd function of the user embedding; ``timestep_path=True`` adds the user's shift of
    the timestep embedding (both in the module docstring).
    """
    unet = _unet(generator)
    if has_user_branch(unet):
        raise ValueError("the denoiser already has a user branch")
    cross_dim = unet.config.cross_attention_dim
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = UserProjection(user_dim, cross_dim, num_tokens)
    unet.add_module(USER_PROJECTION, projection.to(device=generator.device, dtype=generator.dtype))
    processors = {}
    for name, processor in unet.attn_processors.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.is_cross_attention:
            processors[name] = UserAttnProcessor(processor, attn.to_k, attn.to_q.out_features, odd).to(
                device=generator.device, dtype=generator.dtype)
        else:
            processors[name] = PassThroughProcessor(processor)
    unet.set_attn_processor(processors)
    unet.register_forward_pre_hook(_tokens_hook, with_kwargs=True)
    if timestep_path:
        _add_timestep_path(generator, unet, user_dim)
    parameters = user_branch_parameters(generator)
    for p in parameters:
        p.requires_grad_(True)
    return parameters


def user_branch_named_parameters(generator) -> dict[str, nn.Parameter]:
    unet = _unet(generator)
    if not has_user_branch(unet):
        raise ValueError("the denoiser has no user branch: call add_user_branch or load_user_branch first")
    return {name: p for name, p in unet.named_parameters() if _is_user_branch(name)}


def user_branch_parameters(generator) -> list[nn.Parameter]:
    return list(user_branch_named_parameters(generator).values())


def _is_user_branch(name: str) -> bool:
    return name.startswith((USER_PROJECTION + ".", USER_TIMESTEP + ".")) or "_user." in name


def set_user_scale(generator, scale: float) -> None:
    """Scale every user branch (``s`` above): 0 is the base model, 1 the trained personal model."""
    unet = _unet(generator)
    for processor in unet.attn_processors.values():
        if isinstance(processor, UserAttnProcessor):
            processor.scale = float(scale)
    if isinstance(getattr(unet, USER_TIMESTEP, None), UserTimestepProjection):
        getattr(unet, USER_TIMESTEP).scale = float(scale)


def user_branch_is_odd(generator) -> bool:
    """Whether the installed user branch is odd in the embedding (``add_user_branch(odd=True)``)."""
    return any(p.odd for p in _unet(generator).attn_processors.values() if isinstance(p, UserAttnProcessor))


def user_branch_has_timestep_path(generator) -> bool:
    """Whether the installed user branch shifts the timestep embedding (``add_user_branch(timestep_path=True)``)."""
    return isinstance(getattr(_unet(generator), USER_TIMESTEP, None), UserTimestepProjection)


def _set_user_odd(generator, odd: bool) -> None:
    for processor in _unet(generator).attn_processors.values():
        if isinstance(processor, UserAttnProcessor):
            processor.odd = bool(odd)


def user_dim(generator) -> int:
    return getattr(_unet(generator), USER_PROJECTION).user_dim


def save_user_branch(generator, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """The user branch's weights only, as safetensors (``user_dim``/``num_tokens``/``odd``/``timestep_path``
    in the metadata)."""
    from safetensors.torch import save_file

    projection = getattr(_unet(generator), USER_PROJECTION)
    state = {name: p.detach().float().contiguous().cpu() for name, p in user_branch_named_parameters(generator).items()}
    info = {"format": ADAPTER_FORMAT, "user_dim": str(projection.user_dim), "num_tokens": str(projection.num_tokens),
            "odd": str(user_branch_is_odd(generator)).lower(),
            "timestep_path": str(user_branch_has_timestep_path(generator)).lower(), "metadata": json.dumps(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=info)
    return path


def load_user_branch(generator, path: str | os.PathLike) -> dict:
    """Install a user branch saved by :func:`save_user_branch` (frozen); returns its metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no PPD user branch at {path}")
    with safe_open(str(path), framework="pt") as handle:
        info = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if info.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not a PPD user branch (metadata format {info.get('format')!r}, "
                         f"expected {ADAPTER_FORMAT!r})")
    flags = {}
    for key in ("odd", "timestep_path"):  # files from before the options have neither: the plain branch
        flags[key] = info.get(key, "false")
        if flags[key] not in ("true", "false"):
            raise ValueError(f"{path}: metadata {key!r} must be 'true' or 'false', got {flags[key]!r}")
    timestep_path = flags["timestep_path"] == "true"
    unet = _unet(generator)
    if not has_user_branch(unet):
        add_user_branch(generator, int(info["user_dim"]), int(info["num_tokens"]), timestep_path=timestep_path)
    elif user_branch_has_timestep_path(generator) != timestep_path:
        raise ValueError(f"{path} was saved {'with' if timestep_path else 'without'} the timestep path, the "
                         f"installed user branch has {'none' if timestep_path else 'one'}: load it on a UNet "
                         f"without a user branch")
    _set_user_odd(generator, flags["odd"] == "true")  # the file decides the branch's function
    own = user_branch_named_parameters(generator)
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"{path} does not fit this UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != state[name].shape:
                raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, the UNet needs {tuple(p.shape)}")
            p.copy_(state[name])
            p.requires_grad_(False)
    return json.loads(info.get("metadata", "{}"))


def with_user(cond, user_embeds: Tensor | None):
    """``cond`` with ``user_embeds`` ``[U]`` (broadcast) or ``[B, U]``; ``None`` removes them."""
    if user_embeds is not None:
        user_embeds = user_embeds.to(device=cond.prompt_embeds.device, dtype=cond.prompt_embeds.dtype)
        if user_embeds.ndim == 1:
            user_embeds = user_embeds.expand(len(cond), -1)
        if user_embeds.shape[0] != len(cond):
            raise ValueError(f"got {user_embeds.shape[0]} user embeddings for a batch of {len(cond)}")
    return dataclasses.replace(cond, user_embeds=user_embeds)


def sample_personal(model, prompts, user_embedding: Tensor, **sample_kwargs):
    """``generator.sample`` conditioned on one user ``[U]``; the CFG negative is the empty prompt with
    the zero user (so guidance also strengthens the user branch, as IP-Adapter's zero image)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    with torch.no_grad():
        cond = model.encode_prompt(prompts)
        negative = model.negative_cond(1, sample_kwargs.pop("negative_prompt", ""))
    cond = with_user(cond, user_embedding)
    count = len(cond) * sample_kwargs.get("num_images_per_prompt", 1)
    negative = with_user(negative.repeat_interleave(count), torch.zeros_like(user_embedding))
    return model.sample(cond=cond, negative_cond=negative, **sample_kwargs)


# ------------------------------------------------------------------------------ the loss


def ppd_loss(policy_w: Tensor, policy_l: Tensor, reference_w: Tensor, reference_l: Tensor,
             beta: float) -> tuple[Tensor, Tensor]:
    """User-conditioned Diffusion-DPO per pair ``[B]`` and its logits ``z``, from per-sample MSEs
    ``[B]``: the policy's with the user, the reference's (base, no user) without."""
    z = dpo_logits(policy_w, policy_l, reference_w, reference_l, beta)
    return dpo_loss_from_logits(z, "sigmoid"), z


@configclass
class PPDOptions:
    beta: float = field(5000.0, help="DPO strength, Salesforce meaning (as objective dpo)")
    user_dropout: float = field(0.1, help="probability of training a pair with the zero user embedding "
                                          "(PPD: needed for generalisation)")
    num_tokens: int = field(4, help="user tokens the embedding is projected to")
    user_embeddings: str | None = field(None, help="safetensors file {user_id: [U] tensor} for the pairs' user_ids "
                                                   "(or give batches a 'user_embeds' [B, U] tensor)")
    train_lora: bool = field(False, help="also train the trainer's LoRA on the base (default: user branch only)")
    sft_weight: float = field(0.0, help="weight of an extra denoising loss on the winners under their user's "
                                        "embedding (as objective dpo's sft_weight; not in the paper)")
    error_space: str = field("native", help="as objective dpo's: the space the denoising errors are compared in "
                                            "(sample: x0, which weights the high-noise steps where a testbed "
                                            "image's background colour is decided)")
    odd: bool = field(False, help="make the user branch odd in the embedding, branch(-e) = -branch(e): the user "
                                  "with the opposite choices gets the opposite change, and no change is shared "
                                  "by all users (suits visalign's preference-direction embeddings; not in the paper)")
    timestep_path: bool = field(False, help="also add a projection of the user embedding to the UNet's timestep "
                                            "embedding: a global path for whole-image tastes (not in the paper)")


@register_objective("ppd")
class PPD(Objective):
    """User-conditioned Diffusion-DPO on pairs labelled by many users (ALGORITHMS.md §9).

    Batches are pair batches with, per pair, the labelling user's embedding: ``batch["user_embeds"]``
    ``[B, U]``, or ``batch["user_ids"]`` looked up in ``options.user_embeddings``. The user branch
    is installed on construction when the UNet has none.
    """

    data_kinds = ("pair",)
    Options = PPDOptions
    needs_reference = True

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        if self.options.beta <= 0:
            raise ConfigError(f"options.beta must be positive, got {self.options.beta}")
        if self.options.sft_weight < 0:
            raise ConfigError(f"options.sft_weight must be >= 0, got {self.options.sft_weight}")
        if not 0 <= self.options.user_dropout < 1:
            raise ConfigError(f"options.user_dropout must be in [0, 1), got {self.options.user_dropout}")
        check_error_space(generator, self.options.error_space)
        self.table: dict[str, Tensor] = {}
        if self.options.user_embeddings:
            from safetensors.torch import load_file

            self.table = load_file(self.options.user_embeddings)
        if not has_user_branch(_unet(generator)):
            dim = next(iter(self.table.values())).shape[-1] if self.table else None
            if dim is None:
                raise ConfigError("PPD needs a user branch: call add_user_branch(generator, user_dim) or set "
                                  "options.user_embeddings so its dimension is known")
            add_user_branch(generator, dim, self.options.num_tokens, odd=self.options.odd,
                            timestep_path=self.options.timestep_path)
        else:
            installed = {"odd": user_branch_is_odd(generator), "timestep_path": user_branch_has_timestep_path(generator)}
            for key, value in installed.items():
                if getattr(self.options, key) != value:
                    raise ConfigError(f"options.{key} is {getattr(self.options, key)} but the installed user branch "
                                      f"has {key}={value} (add_user_branch(..., {key}=...) must agree)")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The user branch: what ``visalign train`` optimises (plus LoRA with ``train_lora``)."""
        return user_branch_parameters(self.generator)

    def save_trained(self, directory) -> Path:
        """``directory/user_branch.safetensors`` (:func:`load_user_branch` reads it)."""
        o = self.options
        return save_user_branch(self.generator, Path(directory) / "user_branch.safetensors",
                                {"objective": "ppd", "beta": o.beta, "user_dropout": o.user_dropout,
                                 "train_lora": o.train_lora, "odd": o.odd, "timestep_path": o.timestep_path})

    def user_embeds(self, batch: dict) -> Tensor:
        if batch.get("user_embeds") is not None:
            return batch["user_embeds"]
        ids = batch.get("user_ids")
        if ids is None or not self.table:
            raise ValueError("a PPD batch needs 'user_embeds' [B, U], or 'user_ids' with options.user_embeddings")
        missing = sorted({str(i) for i in ids if str(i) not in self.table})
        if missing:
            raise KeyError(f"no user embedding for user ids {missing[:5]} in {self.options.user_embeddings}")
        return torch.stack([self.table[str(i)] for i in ids])

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        winners, losers = batch_latents(gen, batch, ("winner", "loser"), rng)
        pairs = winners.shape[0]
        users = self.user_embeds(batch).to(device=gen.device, dtype=torch.float32)
        if self.options.user_dropout > 0:
            keep = torch.rand(pairs, generator=rng, device=rng.device if rng is not None else None)
            users = users * (keep >= self.options.user_dropout).to(users)[:, None].to(users.device)
        cond = prompt_cond(gen, batch)
        latents = torch.stack([winners, losers], dim=1).flatten(0, 1)  # [w0, l0, w1, l1, ...]
        x_t, _, t, target = paired_noising(gen, latents, 2, rng)
        user_cond = with_user(cond, users).repeat_interleave(2)
        weight = gen.error_weight(t, self.options.error_space)
        policy = (per_sample_mse(gen.predict(x_t, t, user_cond), target) * weight).view(pairs, 2)
        reference = (per_sample_mse(_reference_output(gen, x_t, t, cond.repeat_interleave(2)), target) * weight).view(pairs, 2)
        per_pair, z = ppd_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.options.beta)
        loss = per_pair.mean()
        if self.options.sft_weight:
            loss = loss + self.options.sft_weight * policy[:, 0].mean()
        return loss, pair_metrics(loss, z, policy)


def _reference_output(generator, x_t: Tensor, t: Tensor, cond) -> Tensor:
    """The base model with the new layers off: the denoiser without user tokens (the branch is inert
    then), with LoRA disabled or the frozen copy when the run has them."""
    if generator.has_adapters() or generator._reference_module is not None or generator._reference_adapter is not None:
        return generator.reference().predict(x_t, t, cond)
    # Generator.reference() would take the trainable user branch for full fine-tuning.
    with torch.no_grad():
        return generator.predict(x_t, t, cond)


def fit_user_branch(objective: PPD, batches, steps: int, lr: float = 1e-4, weight_decay: float = 0.0,
                    max_grad_norm: float | None = 1.0, seed: int = 0, log_every: int = 0) -> list[dict]:
    """Train the user branch (and nothing else) with ``objective`` for ``steps`` batches.

    A minimal loop over in-memory batches (the testbed's efficacy script builds its batches from
    synthetic users on the fly); ``visalign train objective=ppd`` runs the same objective on a
    pair dataset with the full trainer (checkpoints, resume, EMA, accelerate). ``batches`` is an
    iterable of pair batches (re-iterated when exhausted). Returns the metrics of each step.
    """
    parameters = objective.trainable_parameters()
    if objective.options.train_lora:
        parameters += [p for p in objective.generator.trainable_parameters() if p not in set(parameters)]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    history, step, iterator = [], 0, iter(batches)
    while step < steps:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            continue
        rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss, metrics = objective.loss(batch, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        history.append(metrics)
        step += 1
        if log_every and step % log_every == 0:
            print(f"ppd step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    return history
