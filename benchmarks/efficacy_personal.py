"""Personalisation efficacy on the testbed: held-out synthetic users, 4 choices each, both routes
(steering with the personal reward; the PPD user-conditioned model) against the base model on the
user's ground-truth utility; held-out oracle accuracy alongside. Also builds the testbed's PPD user
branch (``save=assets/testbed/ppd/user_branch.safetensors``) that ``visalign demo`` uses.

    nice -n 5 python benchmarks/efficacy_personal.py assets/configs/personal/testbed_ppd.yaml [key=value ...]

Steps (all seeded):

1. **Pool**: ``k`` base samples for each of ``P`` train prompts (VAE latents cached once).
2. **Training users**: ``M`` synthetic users with random taste weights (``N(0, 1)`` over the four
   tastes of :mod:`visalign.testbed.users`). Each embeds from 4 choices between random pool images
   (:func:`visalign.personal.embed_user` with the ``testbed`` encoder; ``train_embed=choice``:
   between base samples of the demo's choice prompts, as held-out users do) and labels ``L`` pairs of
   same-prompt images (Bradley-Terry choices, temperature 0.05).
3. **PPD**: the user branch alone is trained with user-conditioned Diffusion-DPO on those pairs
   (:mod:`visalign.algorithms.ppd`), user-embedding dropout 0.1.
4. **Held-out users**: the four named users of the testbed plus ``H`` new random ones, each
   embedded from 4 choices between base samples of the demo's choice prompts. For each held-out
   prompt: ``base`` is the base model's sample of seed s; ``best-of-4`` picks, by the personal reward,
   among the base samples of seeds s..s+3 (so it costs no extra sampling here); ``ppd`` samples with the
   user's embedding and seed s's noise, at each user-branch scale of ``strengths`` (the demo's
   slider). A win is the route's image having the higher ground-truth utility (ties, differences
   under 1e-4, count half).

``load=PATH`` skips steps 1-3 and evaluates a saved user branch (e.g. the shipped one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from visalign.algorithms.ppd import (PPD, PPDOptions, add_user_branch, fit_user_branch, load_user_branch, sample_personal,
                                     save_user_branch, set_user_scale)
from visalign.demo import CHOICE_PROMPTS
from visalign.models import load_generator
from visalign.personal import TestbedPPDConfig, embed_user, load_encoder
from visalign.testbed.oracle import OracleReward
from visalign.testbed.prompts import load_prompts
from visalign.testbed.users import TASTES, USERS, SyntheticUser, draw_choices, taste_features


def random_user(name: str, rng: np.random.Generator) -> SyntheticUser:
    return SyntheticUser(name, dict(zip(TASTES, rng.normal(size=len(TASTES)).tolist())))


@torch.no_grad()
def sample(generator, prompts, per_prompt, steps, cfg, seed):
    rng = torch.Generator().manual_seed(seed)
    return generator.sample(prompts, num_images_per_prompt=per_prompt, num_inference_steps=steps,
                            guidance_scale=cfg, generator=rng).images.cpu()


def win_rate(route: torch.Tensor, base: torch.Tensor, tie: float = 1e-4) -> float:
    """Share of comparisons the route wins; differences under ``tie`` (float noise of the same
    image through another sampling path) count half."""
    gap = route - base
    return ((gap > tie).float() + 0.5 * (gap.abs() <= tie).float()).mean().item()


def ppd_name(strength: float) -> str:
    """Report keys of PPD at a user-branch scale: ``ppd`` at 1, ``ppd_x0.5`` at 0.5."""
    return "ppd" if strength == 1 else f"ppd_x{strength:g}"


def bootstrap(values: np.ndarray, rng: np.random.Generator, n: int = 1000) -> tuple[float, float]:
    """95% interval of the mean over users (rows resampled)."""
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def train_user_branch(generator, encoder, args, rng: np.random.Generator, timings: dict) -> list[dict]:
    """Steps 1-3: the pool, the training users and their pairs, PPD on the user branch alone."""
    start = time.time()
    train_prompts = [r.prompt for r in load_prompts("train")]
    random.Random(args.seed).shuffle(train_prompts)
    train_prompts = train_prompts[: args.train_prompts]
    k = args.per_prompt

    # 1. the pool of base samples and its cached latents / conditioning
    pool = sample(generator, train_prompts, k, args.sample_steps, args.cfg, args.seed)
    with torch.no_grad():
        latents = generator.encode(pool, generator=torch.Generator().manual_seed(args.seed))
        cond = generator.encode_prompt(train_prompts).repeat_interleave(k)
    timings["pool_s"] = time.time() - start

    # 2. training users: embeddings from 4 choices, and labelled same-prompt pairs
    pairs_w, pairs_l, pair_users, embeddings = [], [], [], []
    # training users choose among the train pool, or (train_embed=choice) among base samples of
    # the demo's choice prompts drawn with other seeds than the held-out users'
    embed_pool = pool if args.train_embed == "pool" else sample(generator, list(CHOICE_PROMPTS[:4]), 16, args.sample_steps, args.cfg, args.seed + 5)
    for index in range(args.train_users):
        user = random_user(f"train{index}", rng)
        picked = rng.choice(len(embed_pool), 8, replace=False)
        choices = draw_choices(user, embed_pool[picked], 4, rng)
        embeddings.append(embed_user(encoder, embed_pool[[picked[c] for c, _ in choices]], embed_pool[[picked[r] for _, r in choices]]))
        for _ in range(args.pairs_per_user):
            group = int(rng.integers(len(train_prompts))) * k
            (winner, loser), = draw_choices(user, pool[group : group + k], 1, rng)
            pairs_w.append(group + winner)
            pairs_l.append(group + loser)
            pair_users.append(index)
    embeddings = torch.stack(embeddings)
    pairs_w, pairs_l, pair_users = map(torch.tensor, (pairs_w, pairs_l, pair_users))

    epochs = iter(range(1 << 30))

    def batches():
        # a new order every epoch (seeded)
        order = torch.randperm(len(pairs_w), generator=torch.Generator().manual_seed(args.seed * 7919 + next(epochs)))
        for begin in range(0, len(order) - args.batch_size + 1, args.batch_size):
            rows = order[begin : begin + args.batch_size]
            w, l = pairs_w[rows], pairs_l[rows]
            yield {"prompts": [train_prompts[int(i) // k] for i in w], "winner": pool[w], "loser": pool[l],
                   "user_embeds": embeddings[pair_users[rows]],
                   "cached": {"winner": latents[w], "loser": latents[l], "cond": cond[w]}}

    class Batches:
        def __iter__(self):
            return batches()

    # 3. PPD: only the user branch trains
    add_user_branch(generator, encoder.embed_dim, num_tokens=args.num_tokens, seed=args.seed, odd=args.odd,
                    timestep_path=args.timestep_path)
    objective = PPD(generator, PPDOptions(beta=args.beta, user_dropout=args.user_dropout, num_tokens=args.num_tokens,
                                             sft_weight=args.sft_weight, error_space=args.error_space, odd=args.odd,
                                             timestep_path=args.timestep_path))
    begin = time.time()
    history = fit_user_branch(objective, Batches(), steps=args.steps, lr=args.lr, seed=args.seed, log_every=50)
    timings["train_s"] = time.time() - begin
    print(f"trained {args.steps} steps in {timings['train_s']:.0f} s", flush=True)
    return history


def main() -> None:
    import sys

    from visalign.config import load_config

    argv = sys.argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    args = load_config(TestbedPPDConfig, path, argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    generator = load_generator(args.model)
    encoder = load_encoder("testbed")
    if args.load:
        load_user_branch(generator, args.load)
        history = None
    else:
        history = train_user_branch(generator, encoder, args, rng, timings)
        if args.save:
            save_user_branch(generator, args.save, {
                "encoder": "testbed", "train_users": args.train_users, "pairs": args.train_users * args.pairs_per_user,
                "steps": args.steps, "lr": args.lr, "beta": args.beta, "user_dropout": args.user_dropout,
                "sft_weight": args.sft_weight, "error_space": args.error_space, "odd": args.odd,
                "timestep_path": args.timestep_path,
                "train_embed": args.train_embed, "model": args.model, "built_by": "benchmarks/efficacy_personal.py"})

    # 4. held-out users and prompts
    begin = time.time()
    # the held-out users and their choices draw from their own stream, so they are the same
    # users whatever the training set's size
    rng = np.random.default_rng(args.seed + 1000)
    heldout_users = list(USERS.values()) + [random_user(f"heldout{i}", rng) for i in range(args.heldout_users)]
    heldout_prompts = [r.prompt for r in load_prompts("heldout")]
    random.Random(args.seed + 1).shuffle(heldout_prompts)
    heldout_prompts = heldout_prompts[: args.heldout_prompts]
    choice_pool = sample(generator, list(CHOICE_PROMPTS[:4]), 4, args.sample_steps, args.cfg, args.seed + 7)
    # base: seeds s..s+3 per prompt (one sampling call: noise drawn prompt-major); candidate 0 is "base"
    candidates = sample(generator, heldout_prompts, 4, args.sample_steps, args.cfg, args.seed + 11)
    oracle = OracleReward()
    repeated = [p for p in heldout_prompts for _ in range(4)]
    candidate_oracle = oracle(candidates, repeated).view(-1, 4)
    candidate_embeddings = encoder.embed_images(candidates)
    # PPD samples with the same initial noise as candidate 0 of each prompt
    noise_rng = torch.Generator().manual_seed(args.seed + 11)
    noise = torch.randn(generator.latent_shape(len(repeated)), generator=noise_rng).view(len(heldout_prompts), 4, -1)
    latents0 = noise[:, 0].reshape(len(heldout_prompts), *generator.latent_shape(1)[1:])
    base_features = taste_features(candidates.view(len(heldout_prompts), 4, *candidates.shape[1:])[:, 0])
    rows = []
    for user in heldout_users:
        picked = rng.choice(len(choice_pool), 8, replace=False)
        choices = draw_choices(user, choice_pool[picked], 4, rng)
        embedding = embed_user(encoder, choice_pool[[picked[c] for c, _ in choices]],
                               choice_pool[[picked[r] for _, r in choices]])
        utility = user.utility(candidates).view(-1, 4)
        best = (candidate_embeddings @ embedding).view(-1, 4).argmax(1)
        picked_utility = utility.gather(1, best[:, None])[:, 0]
        row = {
            "user": user.name, "weights": user.weights,
            "base_utility": utility[:, 0].mean().item(),
            "best_of_4_utility": picked_utility.mean().item(),
            "best_of_4_win_rate": win_rate(picked_utility, utility[:, 0]),
            "best_of_4_oracle": candidate_oracle.gather(1, best[:, None]).mean().item(),
        }
        for strength in args.strengths:
            set_user_scale(generator, strength)
            with torch.no_grad():
                ppd_images = sample_personal(generator, heldout_prompts, embedding, num_inference_steps=args.sample_steps,
                                             guidance_scale=args.cfg, latents=latents0).images.cpu()
            ppd_utility = user.utility(ppd_images)
            name = ppd_name(strength)
            row[f"{name}_utility"] = ppd_utility.mean().item()
            row[f"{name}_win_rate"] = win_rate(ppd_utility, utility[:, 0])
            row[f"{name}_oracle"] = oracle(ppd_images, heldout_prompts).mean().item()
            # which way the branch moved each taste for this user (PPD minus base, mean over prompts)
            row[f"{name}_taste_delta"] = dict(zip(TASTES, (taste_features(ppd_images) - base_features).mean(0).tolist()))
        set_user_scale(generator, 1.0)
        rows.append(row)
        print(json.dumps({"user": user.name, **{key: round(v, 3) for key, v in row.items() if isinstance(v, float)}}), flush=True)
    timings["eval_s"] = time.time() - begin
    # PPD samples start from candidate 0's noise: with a zero user branch they are candidate 0 up
    # to float noise (max pixel difference 2e-5 on the testbed model, session 12), hence the tie
    # tolerance of win_rate
    base_oracle = candidate_oracle[:, 0].mean().item()
    summary = {}
    stats_rng = np.random.default_rng(0)
    for key in [key for key, value in rows[0].items() if isinstance(value, float)]:
        values = np.array([row[key] for row in rows])
        summary[key] = {"mean": float(values.mean()), "ci95_over_users": bootstrap(values, stats_rng),
                        "users_above_half": int((values > 0.5).sum()) if "win" in key else None}
    summary["base_oracle"] = base_oracle
    summary["train"] = None if history is None else {"first_loss": history[0]["loss"], "last_50_loss": float(np.mean([h["loss"] for h in history[-50:]])),
                        "last_50_implicit_accuracy": float(np.mean([h["implicit_accuracy"] for h in history[-50:]])),
                        "ln2": math.log(2)}
    report = {"config": dataclasses.asdict(args), "summary": summary, "per_user": rows, "timings_s": timings,
              "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "gpu": None}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
