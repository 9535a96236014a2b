"""What the PPD user branch costs: the UNet forward with and without a user (plain branch, odd
branch ``PPDOptions.odd``, odd branch with ``timestep_path``), and one PPD training step (user
branch only, the same three) against one Diffusion-DPO step (LoRA), measured interleaved in one run.

    python benchmarks/bench_ppd.py --model assets/testbed/sd --batch 16 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from visalign.algorithms.dpo import DiffusionDPO, DPOOptions
from visalign.algorithms.ppd import PPD, PPDOptions, add_user_branch, with_user
from visalign.models import load_generator


def median_time(fn, repeats: int) -> float:
    """Median process CPU time of ``fn`` (steadier than the wall clock on a shared machine)."""
    times = []
    for _ in range(repeats):
        begin = time.process_time()
        fn()
        times.append(time.process_time() - begin)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="assets/testbed/sd")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--user-dim", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_generator(args.model)
    ppd_model = copy.deepcopy(base)
    add_user_branch(ppd_model, args.user_dim)
    odd_model = copy.deepcopy(base)
    add_user_branch(odd_model, args.user_dim, odd=True)
    path_model = copy.deepcopy(base)
    add_user_branch(path_model, args.user_dim, odd=True, timestep_path=True)
    dpo_model = copy.deepcopy(base)
    dpo_model.add_lora(rank=4)
    size = base.default_resolution
    g = torch.Generator().manual_seed(0)
    prompts = ["a red circle"] * args.batch
    users = torch.nn.functional.normalize(torch.randn(args.batch, args.user_dim, generator=g), dim=-1)
    batch = {"prompts": prompts, "winner": torch.rand(args.batch, 3, size, size, generator=g),
             "loser": torch.rand(args.batch, 3, size, size, generator=g), "user_embeds": users}
    cond = base.encode_prompt(prompts)
    x_t = torch.randn(base.latent_shape(args.batch), generator=g)
    t = torch.full((args.batch,), 500)
    ppd, dpo = PPD(ppd_model, PPDOptions(user_dropout=0.0)), DiffusionDPO(dpo_model, DPOOptions())
    odd = PPD(odd_model, PPDOptions(user_dropout=0.0, odd=True))
    path = PPD(path_model, PPDOptions(user_dropout=0.0, odd=True, timestep_path=True))

    def forward(model, c):
        with torch.no_grad():
            model.predict(x_t, t, c)

    def step(objective):
        loss, _ = objective.loss(batch, torch.Generator().manual_seed(1))
        loss.backward()

    cases = {
        "forward_base": lambda: forward(base, cond),
        "forward_ppd_no_user": lambda: forward(ppd_model, cond),
        "forward_ppd_user": lambda: forward(ppd_model, with_user(cond, users)),
        "forward_odd_user": lambda: forward(odd_model, with_user(cond, users)),
        "forward_odd_path_user": lambda: forward(path_model, with_user(cond, users)),
        "step_dpo_lora": lambda: step(dpo),
        "step_ppd_branch": lambda: step(ppd),
        "step_odd_branch": lambda: step(odd),
        "step_odd_path_branch": lambda: step(path),
    }
    for fn in cases.values():  # warm-up
        fn()
    results = {name: 0.0 for name in cases}
    rounds = 3
    for _ in range(rounds):  # interleaved, so load changes hit every case alike
        for name, fn in cases.items():
            results[name] += median_time(fn, args.repeats) / rounds
    report = {
        "cpu_seconds": results,
        "ratios": {
            "forward_user_over_base": results["forward_ppd_user"] / results["forward_base"],
            "forward_no_user_over_base": results["forward_ppd_no_user"] / results["forward_base"],
            "step_ppd_over_dpo_lora": results["step_ppd_branch"] / results["step_dpo_lora"],
            "forward_odd_user_over_base": results["forward_odd_user"] / results["forward_base"],
            "step_odd_over_plain_ppd": results["step_odd_branch"] / results["step_ppd_branch"],
            "forward_odd_path_user_over_odd_user": results["forward_odd_path_user"] / results["forward_odd_user"],
            "step_odd_path_over_odd": results["step_odd_path_branch"] / results["step_odd_branch"],
        },
        "trainable_parameters": {"ppd_branch": sum(p.numel() for p in ppd.trainable_parameters()),
                                 "dpo_lora_rank4": sum(p.numel() for p in dpo_model.trainable_parameters()),
                                 "unet": sum(p.numel() for p in base.denoiser.parameters())},
        "args": vars(args),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
