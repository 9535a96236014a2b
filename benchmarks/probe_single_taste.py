"""Does preference training on pairs labelled by ONE single-taste user move that taste? (issue 12)

A diagnostic of the PPD route (benchmarks/RESULTS.md, "Session 13" under Personalisation): one
synthetic user whose utility is one taste feature (default ``darkness``) labels all same-prompt
pairs of a pool of base samples whose gap in that taste is at least ``--min-gap``; then either

- ``--mode dpo``: Diffusion-DPO on a LoRA (no user branch), or
- ``--mode ppd``: the PPD user branch, with the unit embedding of that taste on every pair,

trains on them, and every ``--eval-every`` steps the mean change of the four taste features
against the base model is measured on held-out prompts with the same noise, at CFG 5 and CFG 1
(PPD also with the user in the CFG negative).

    python benchmarks/probe_single_taste.py --mode ppd --error-space sample --beta 100 --sft-weight 25

Writes ``--out`` (JSON: the settings and the curve).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "testbed" / "sd"))
    parser.add_argument("--mode", choices=("dpo", "ppd"), default="ppd")
    parser.add_argument("--taste", default="darkness")
    parser.add_argument("--sign", type=float, default=1.0, help="+1: the user wants more of the taste, -1: less")
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--min-gap", type=float, default=0.05, help="pairs closer than this in utility are left out")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=2000.0)
    parser.add_argument("--error-space", default="native")
    parser.add_argument("--sft-weight", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (dpo mode)")
    parser.add_argument("--heldout-prompts", type=int, default=24)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/probe_single_taste.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch

    from visalign.algorithms.dpo import DiffusionDPO, DPOOptions
    from visalign.algorithms.ppd import PPD, PPDOptions, add_user_branch, sample_personal, with_user
    from visalign.models import load_generator
    from visalign.testbed.prompts import load_prompts
    from visalign.testbed.users import TASTES, SyntheticUser, taste_features

    if args.taste not in TASTES:
        raise SystemExit(f"--taste must be one of {TASTES}, got {args.taste!r}")
    torch.set_num_threads(1)
    generator = load_generator(args.model)
    train_prompts = [r.prompt for r in load_prompts("train")]
    random.Random(args.seed).shuffle(train_prompts)
    train_prompts = train_prompts[: args.train_prompts]
    k = args.per_prompt
    with torch.no_grad():
        pool = generator.sample(train_prompts, num_images_per_prompt=k, num_inference_steps=args.sample_steps,
                                guidance_scale=5.0, generator=torch.Generator().manual_seed(args.seed)).images.cpu()
        latents = generator.encode(pool, generator=torch.Generator().manual_seed(args.seed))
        cond = generator.encode_prompt(train_prompts).repeat_interleave(k)

    # every same-prompt pair with a clear utility gap, the preferred image first
    user = SyntheticUser("probe", {args.taste: args.sign})
    utility = user.utility(pool).view(-1, k)
    winners, losers = [], []
    for p in range(len(train_prompts)):
        for i in range(k):
            for j in range(i + 1, k):
                if abs(utility[p, i] - utility[p, j]) >= args.min_gap:
                    w, l = (i, j) if utility[p, i] > utility[p, j] else (j, i)
                    winners.append(k * p + w)
                    losers.append(k * p + l)
    if not winners:
        raise SystemExit(f"no pair of the pool differs by --min-gap {args.min_gap} in {args.taste}")
    winners, losers = torch.tensor(winners), torch.tensor(losers)
    gap = (user.utility(pool[winners]) - user.utility(pool[losers])).mean().item()
    print(f"{len(winners)} pairs; mean utility gap {gap:.3f}", flush=True)

    heldout = [r.prompt for r in load_prompts("heldout")]
    random.Random(args.seed + 1).shuffle(heldout)
    heldout = heldout[: args.heldout_prompts]
    noise = torch.randn(generator.latent_shape(len(heldout)), generator=torch.Generator().manual_seed(args.seed + 3))
    embedding = torch.zeros(len(TASTES))
    embedding[TASTES.index(args.taste)] = 1.0

    def features(cfg: float, trained: bool, user_in_negative: bool = False) -> torch.Tensor:
        kwargs = {"num_inference_steps": args.sample_steps, "guidance_scale": cfg, "latents": noise.clone()}
        with torch.no_grad():
            if args.mode == "ppd" and trained and user_in_negative:
                images = generator.sample(cond=with_user(generator.encode_prompt(heldout), embedding),
                                          negative_cond=with_user(generator.negative_cond(len(heldout)), embedding),
                                          **kwargs).images
            elif args.mode == "ppd" and trained:
                images = sample_personal(generator, heldout, embedding, **kwargs).images
            else:
                images = generator.sample(heldout, **kwargs).images
        return taste_features(images.cpu()).mean(0)

    base = {cfg: features(cfg, False) for cfg in (5.0, 1.0)}
    if args.mode == "dpo":
        parameters = generator.add_lora(rank=args.rank)
        objective = DiffusionDPO(generator, DPOOptions(beta=args.beta, error_space=args.error_space,
                                                       sft_weight=args.sft_weight))
    else:
        parameters = add_user_branch(generator, len(TASTES), num_tokens=4, seed=args.seed)
        objective = PPD(generator, PPDOptions(beta=args.beta, user_dropout=0.0, error_space=args.error_space,
                                              sft_weight=args.sft_weight))
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    report = {"args": vars(args), "pairs": len(winners), "mean_gap": gap, "tastes": list(TASTES), "curve": []}
    history, start = [], time.time()
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(winners), (args.batch_size,), generator=torch.Generator().manual_seed(10_000 + step))
        w, l = winners[rows], losers[rows]
        batch = {"prompts": [train_prompts[int(i) // k] for i in w], "winner": pool[w], "loser": pool[l],
                 "cached": {"winner": latents[w], "loser": latents[l], "cond": cond[w]}}
        if args.mode == "ppd":
            batch["user_embeds"] = embedding.expand(args.batch_size, -1)
        loss, metrics = objective.loss(batch, torch.Generator().manual_seed(step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        history.append(metrics)
        if step % args.eval_every == 0 or step == args.steps:
            recent = history[-args.eval_every:]
            row = {"step": step, "seconds": round(time.time() - start, 1),
                   **{key: float(np.mean([h[key] for h in recent])) for key in ("loss", "implicit_accuracy",
                                                                                "mse_winner", "mse_loser")}}
            for cfg in (5.0, 1.0):
                row[f"delta_cfg{cfg:g}"] = (features(cfg, True) - base[cfg]).tolist()
            if args.mode == "ppd":
                row["delta_cfg5_user_in_negative"] = (features(5.0, True, True) - base[5.0]).tolist()
            report["curve"].append(row)
            print(json.dumps({key: [round(v, 3) for v in value] if isinstance(value, list) else
                              (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}),
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
