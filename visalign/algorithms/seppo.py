"""SePPO: Semi-Policy Preference Optimization (Zhang et al. 2024, arXiv 2410.05255; v2 "SSPO").
ALGORITHMS.md §4.

Preference optimisation from **winners only**: the loser of each DPO pair is a sample the
policy's own earlier self generated for the same prompt.

1. A pool of earlier checkpoints ``{theta_0, theta_k, ...}`` (a snapshot every ``save_every``
   steps, at most ``pool_size``; LoRA deltas in LoRA runs, state-dict copies otherwise).
2. Each optimisation step picks the reference among them: ``random`` (uniform, the paper's
   "random checkpoint replay", default), ``initial`` or ``latest``. It is never the current
   weights: only snapshots taken at earlier steps are eligible (at step 0 that is ``theta_0``,
   which the policy still equals).
3. The reference generates ``x^ref`` for each prompt of the batch (its normal sampler,
   deterministic: the noise is a function of (seed, checkpoint, prompt), so samples are cached
   per (checkpoint, prompt) and a cache hit returns the very sample a miss would generate).
4. With one noise and timestep shared by the anchor ``x^w`` and ``x^ref`` (``paired_noising``)::

       m_w, m_r  = mse(f_theta(x_t^w), target_w), mse(f_theta(x_t^ref), target_ref)   one batched forward
       r_w, r_r  = the same with the reference checkpoint, no gradient
       mu        = sign(r_w - m_w)            anchor-based adaptive flipper, no gradient
                   (variant "indicator": 1[r_w - m_w > 0]; ties: options.tie, default +1)
       z         = -(beta/2) * ((m_w - r_w) - mu * (m_r - r_r))
       loss      = -log_sigmoid(z)

   ``mu = +1`` (the policy fits the winner better than the reference does) is Diffusion-DPO
   with ``x^ref`` as the loser: :func:`seppo_logits` *is* :func:`~visalign.algorithms.dpo.dpo_logits`
   with the loser terms multiplied by ``mu``. ``mu = -1`` treats ``x^ref`` as a second winner;
   ``mu = 0`` (indicator variant) drops it, leaving an SFT-like term on the anchor.

Ties: at step 0 the policy equals the reference, ``r_w - m_w = 0`` and ``torch.sign`` gives 0.
The paper does not say what happens; we treat ties as ``+1`` by default (DPO at
initialisation: loss ln 2), configurable.

Unrecovered from the paper: beta and lr (we start from Diffusion-DPO's SD1.5 beta 5000), and the
reference sampler's settings (we use the model's normal sampler: DDIM / flow Euler, 50 steps,
CFG 7.5 for SD1.5; the testbed recipe uses 20 steps, CFG 4).
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, configclass, field
from ..training.objective import Objective, register_objective
from .common import batch_latents, paired_noising, per_sample_mse, prompt_cond, prompt_dropout_mask
from .dpo import LOSS_TYPES, dpo_logits, dpo_loss_from_logits, implicit_accuracy

STRATEGIES = ("random", "initial", "latest")
FLIPPERS = ("sign", "indicator")


# ------------------------------------------------------------------------------ the loss


def anchor_flipper(policy_anchor: Tensor, reference_anchor: Tensor, variant: str = "sign", tie: float = 1.0) -> Tensor:
    """SePPO's anchor-based adaptive flipper ``mu`` per sample ``[B]``, without gradient.

    ``sign``: ``sign(r_w - m_w)`` in {-1, +1}; ``indicator``: ``1[r_w - m_w > 0]`` in {0, 1}.
    Exact ties (``r_w == m_w``, e.g. at initialisation) get ``tie``.
    """
    if variant not in FLIPPERS:
        raise ValueError(f"unknown flipper variant {variant!r}; expected one of {FLIPPERS}")
    gap = (reference_anchor - policy_anchor).detach()
    mu = torch.sign(gap) if variant == "sign" else (gap > 0).to(gap.dtype)
    return torch.where(gap == 0, torch.full_like(mu, tie), mu)


def seppo_logits(policy_anchor: Tensor, policy_sample: Tensor, reference_anchor: Tensor, reference_sample: Tensor,
                 mu: Tensor, beta: float) -> Tensor:
    """``z = -(beta/2) * ((m_w - r_w) - mu (m_ref - r_ref))``; Diffusion-DPO's logit with the
    reference sample as the loser, its terms scaled by the (detached) flipper ``mu``."""
    mu = mu.detach()
    return dpo_logits(policy_anchor, mu * policy_sample, reference_anchor, mu * reference_sample, beta)


# ------------------------------------------------------------------------------ the checkpoint pool


def weights_digest(weights: dict[str, Tensor]) -> str:
    """A SHA-256 of named tensors (names, dtypes, shapes and values), to identify a checkpoint."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        value = weights[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def snapshot_weights(generator) -> dict[str, Tensor]:
    """The policy's current weights as CPU copies: the adapter's state dict in a LoRA run
    (``Generator.set_reference`` loads it back with the adapter's own rank and alpha), else the
    denoiser's whole state dict."""
    if generator.has_adapters():
        return {k: v.detach().to("cpu").clone() for k, v in generator.lora_state_dict().items()}
    return {k: v.detach().to("cpu").clone() for k, v in generator.denoiser.state_dict().items()}


def frozen_view(generator, module: torch.nn.Module):
    """A Generator view (sharing every module) whose denoiser calls run ``module``, e.g. a frozen
    earlier checkpoint or a lagged copy of the policy. Call its ``predict`` / ``sample`` under
    ``torch.no_grad()``: ``module``'s weights do not require grad."""
    view = copy.copy(generator)
    view.set_forward_module(module)
    return view


@dataclass
class PoolEntry:
    step: int           # the optimisation step whose starting weights this is (0 = theta_0)
    weights: dict       # CPU tensors: a LoRA delta or a full denoiser state dict
    digest: str


class CheckpointPool:
    """Earlier weights of the policy, at most ``max_size`` (``theta_0`` always kept; when full,
    the oldest other entry leaves)."""

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"a checkpoint pool holds at least 1 entry, got max_size={max_size}")
        self.max_size = max_size
        self.entries: list[PoolEntry] = []

    def add(self, step: int, weights: dict[str, Tensor]) -> PoolEntry:
        entry = PoolEntry(step, weights, weights_digest(weights))
        self.entries.append(entry)
        if len(self.entries) > self.max_size:
            del self.entries[1 if self.max_size > 1 else 0]
        return entry

    def eligible(self, step: int) -> list[PoolEntry]:
        """Snapshots taken before ``step`` (at step 0: ``theta_0``). The policy has been updated
        since each of them, so none is the current weights."""
        earlier = [e for e in self.entries if e.step < step]
        if step == 0 or not earlier:
            return earlier or self.entries[:1]
        return earlier

    def select(self, strategy: str, step: int, rng: random.Random) -> PoolEntry:
        candidates = self.eligible(step)
        if not candidates:
            raise RuntimeError("the checkpoint pool is empty: add theta_0 first")
        if strategy == "random":
            return candidates[rng.randrange(len(candidates))]
        if strategy == "initial":
            return candidates[0]
        if strategy == "latest":
            return candidates[-1]
        raise ValueError(f"unknown reference strategy {strategy!r}; expected one of {STRATEGIES}")

    def state_dict(self) -> dict:
        return {"max_size": self.max_size, "entries": [(e.step, e.weights, e.digest) for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.max_size = state["max_size"]
        self.entries = [PoolEntry(step, weights, digest) for step, weights, digest in state["entries"]]


# ------------------------------------------------------------------------------ the objective


@configclass
class SePPOOptions:
    beta: float = field(5000.0, help="KL strength, Salesforce meaning (unrecovered in the paper: DPO's SD1.5 value)")
    loss_type: str = field("sigmoid", help="sigmoid (paper), hinge or ipo (as Diffusion-DPO)")
    reference_strategy: str = field("random", help="random (paper's best), initial, or latest earlier checkpoint")
    pool_size: int = field(7, help="most checkpoints kept (paper: K = 7); theta_0 always stays")
    save_every: int = field(30, help="optimisation steps between pool snapshots (paper: 30)")
    flipper: str = field("sign", help="sign (mu in {-1,+1}) or indicator (mu in {0,1}, v2's DPO/SFT switch)")
    tie: float = field(1.0, help="mu where r_w == m_w exactly (step 0): +1 (DPO), 0 or -1 (sign only)")
    num_inference_steps: int = field(50, help="reference sampler steps")
    guidance_scale: float = field(7.5, help="reference sampler CFG scale")
    cache_size: int = field(4096, help="reference samples cached per (checkpoint, prompt); 0 turns the cache off")
    prompt_dropout: float = field(0.0, help="probability of training a sample with the empty prompt")
    sft_weight: float = field(0.0, help="weight of an extra denoising loss on the winners (visalign's addition, "
                                        "as DPO's: about beta / 4 keeps the anchors' likelihood rising)")


@register_objective("seppo")
class SePPO(Objective):
    """SePPO on winners-only data (captioned images, or the winners of pairs)."""

    data_kinds = ("caption", "pair")
    Options = SePPOOptions
    # The reference is one of SePPO's own pool checkpoints: a LoRA adapter (LoRA runs) or a frozen
    # module of its own (full runs), so the trainer need not snapshot one.
    needs_reference = False

    def __init__(self, generator, options=None):
        super().__init__(generator, options)
        o = self.options
        if o.loss_type not in LOSS_TYPES:
            raise ConfigError(f"options.loss_type must be one of {LOSS_TYPES}, got {o.loss_type!r}")
        if o.reference_strategy not in STRATEGIES:
            raise ConfigError(f"options.reference_strategy must be one of {STRATEGIES}, got {o.reference_strategy!r}")
        if o.flipper not in FLIPPERS:
            raise ConfigError(f"options.flipper must be one of {FLIPPERS}, got {o.flipper!r}")
        allowed_ties = (1.0, 0.0, -1.0) if o.flipper == "sign" else (1.0, 0.0)
        if o.tie not in allowed_ties:
            raise ConfigError(f"options.tie must be one of {allowed_ties} for flipper={o.flipper}, got {o.tie}")
        if o.pool_size < 1 or o.save_every < 1:
            raise ConfigError(f"options.pool_size and options.save_every must be >= 1, got {o.pool_size}, {o.save_every}")
        if o.beta <= 0:
            raise ConfigError(f"options.beta must be positive, got {o.beta}")
        if o.sft_weight < 0:
            raise ConfigError(f"options.sft_weight must be >= 0, got {o.sft_weight}")
        self.pool = CheckpointPool(o.pool_size)
        self.cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self.seed = 0
        self.current: PoolEntry | None = None
        self._reference = None
        self._loaded_digest: str | None = None
        self._reference_module: torch.nn.Module | None = None
        self.stats = {"reference_sample_s": 0.0, "reference_sample_cpu_s": 0.0, "cache_hits": 0, "cache_misses": 0}

    # ---------------------------------------------------------------- set-up and the pool

    def setup(self, trainer) -> None:
        self.seed = trainer.config.seed
        self.start()

    def start(self) -> None:
        """Snapshot ``theta_0`` (called by :meth:`setup`; call it yourself without a trainer)."""
        if not self.generator.has_adapters():
            # Full fine-tuning: one frozen module into which the selected checkpoint is loaded.
            self._reference_module = copy.deepcopy(self.generator.denoiser).requires_grad_(False).eval()
        if not self.pool.entries:
            self.pool.add(0, snapshot_weights(self.generator))

    def before_step(self, trainer, step: int) -> None:
        self.select_reference(step)

    def select_reference(self, step: int) -> PoolEntry:
        """Pick this step's reference (a function of (seed, step)), then snapshot the current
        weights into the pool if ``step`` is a save step (eligible from the next step on)."""
        if not self.pool.entries:
            self.start()
        rng = random.Random(self.seed * 1_000_003 + step)
        entry = self.pool.select(self.options.reference_strategy, step, rng)
        self._use(entry)
        if step > 0 and step % self.options.save_every == 0 and all(e.step != step for e in self.pool.entries):
            self.pool.add(step, snapshot_weights(self.generator))
            live = {e.step for e in self.pool.entries}
            for key in [k for k in self.cache if k[0] not in live]:
                del self.cache[key]
        return entry

    def _use(self, entry: PoolEntry) -> None:
        gen = self.generator
        if entry.digest != self._loaded_digest:
            if gen.has_adapters():
                gen.set_reference(entry.weights)  # an inactive adapter "reference"
            else:
                self._reference_module.load_state_dict(entry.weights)
            self._loaded_digest = entry.digest
            if gen.has_adapters():
                self._reference = gen.reference()
            else:
                self._reference = frozen_view(gen, self._reference_module)
        self.current = entry

    def reference(self):
        """The Generator view of the selected checkpoint (predict/sample under no_grad)."""
        if self.current is None:
            raise RuntimeError("no reference selected: the trainer calls before_step (or call select_reference)")
        return self._reference

    # ---------------------------------------------------------------- reference samples

    def reference_samples(self, prompts: list[str], height: int, width: int) -> Tensor:
        """Latents ``[B, C, h, w]`` of the selected checkpoint's samples for ``prompts``, from the
        cache where present; misses are generated in one batched call."""
        entry = self.current
        options = self.options
        result: list[Tensor | None] = [None] * len(prompts)
        missing: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            key = (entry.step, prompt, height, width)
            if options.cache_size and key in self.cache:
                self.cache.move_to_end(key)
                result[i] = self.cache[key]
                self.stats["cache_hits"] += 1
            else:
                missing.setdefault(prompt, []).append(i)
        if missing:
            start, start_cpu = time.perf_counter(), time.process_time()
            unique = list(missing)
            gen = self.generator
            shape = gen.latent_shape(1, height, width)[1:]
            noise = torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(self._noise_seed(entry.step, p)))
                for p in unique]).to(device=gen.device, dtype=gen.dtype)
            noise = noise * getattr(gen.scheduler, "init_noise_sigma", 1.0)
            with torch.no_grad():
                out = self._reference.sample(unique, latents=noise, num_inference_steps=options.num_inference_steps,
                                             guidance_scale=options.guidance_scale, eta=0.0, height=height,
                                             width=width, output_type="latent")
            for prompt, latent in zip(unique, out.latents.detach()):
                for i in missing[prompt]:
                    result[i] = latent
                if options.cache_size:
                    self.cache[(entry.step, prompt, height, width)] = latent
            while len(self.cache) > options.cache_size:
                self.cache.popitem(last=False)
            self.stats["cache_misses"] += sum(len(v) for v in missing.values())
            self.stats["reference_sample_s"] += time.perf_counter() - start
            self.stats["reference_sample_cpu_s"] += time.process_time() - start_cpu
        return torch.stack(result)

    def _noise_seed(self, checkpoint_step: int, prompt: str) -> int:
        text = hashlib.sha256(prompt.encode()).digest()
        return (self.seed * 1_000_003 + checkpoint_step * 7_919 + int.from_bytes(text[:6], "little")) % (2**63 - 1)

    # ---------------------------------------------------------------- the loss

    def loss(self, batch: dict, rng: torch.Generator):
        gen = self.generator
        key = "images" if "images" in batch else "winner"
        (anchors,) = batch_latents(gen, batch, (key,), rng)
        prompts = list(batch["prompts"])
        height, width = batch[key].shape[-2], batch[key].shape[-1]
        samples = self.reference_samples(prompts, height, width).to(anchors)
        count = anchors.shape[0]
        drop = prompt_dropout_mask(count, self.options.prompt_dropout, rng)
        cond = prompt_cond(gen, batch, drop).repeat_interleave(2)
        # [w0, ref0, w1, ref1, ...]: one noise and one timestep per anchor and its reference sample.
        latents = torch.stack([anchors, samples], dim=1).flatten(0, 1)
        x_t, _, t, target = paired_noising(gen, latents, 2, rng)
        policy = per_sample_mse(gen.predict(x_t, t, cond), target).view(count, 2)
        with torch.no_grad():
            reference = per_sample_mse(self.reference().predict(x_t, t, cond), target).view(count, 2)
        mu = anchor_flipper(policy[:, 0], reference[:, 0], self.options.flipper, self.options.tie)
        z = seppo_logits(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], mu, self.options.beta)
        loss = dpo_loss_from_logits(z, self.options.loss_type).mean()
        if self.options.sft_weight:
            loss = loss + self.options.sft_weight * policy[:, 0].mean()
        metrics = {
            "loss": loss.detach().item(),
            "mu_mean": mu.mean().item(),
            "flipped": (mu < 0).float().mean().item(),
            "implicit_accuracy": implicit_accuracy(z.detach()).item(),
            "margin": z.detach().mean().item(),
            "mse_winner": policy[:, 0].detach().mean().item(),
            "mse_reference_sample": policy[:, 1].detach().mean().item(),
            "ref_mse_winner": reference[:, 0].mean().item(),
            "reference_step": float(self.current.step),
            "pool_size": float(len(self.pool.entries)),
        }
        return loss, metrics

    # ---------------------------------------------------------------- resume

    def state_dict(self):
        # The cache is not saved: a sample is a function of (seed, checkpoint, prompt), so a resumed
        # run regenerates exactly what it would have read.
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state):
        self.pool.load_state_dict(state["pool"])
        self.cache.clear()
        self._loaded_digest = None
        self.current = None
