"""Benchmark of online reward fine-tuning (issue 11): what do trajectory collection and an
optimisation step on stored transitions cost beyond the work they cannot avoid?

(a) **Collection**: ``collect_rollout`` (stochastic sampling that keeps every state and the
    per-step log-probs, with CFG, decoded images) against plain ``Generator.sample`` of the same
    prompts, steps, CFG and eta without a trajectory. Reported as samples/s and their ratio
    (target >= 0.9: storing log-probs must be nearly free).
(b) **Optimisation step**: ``DDPO.loss`` (B transitions) and ``PRDP.loss`` (B pair-steps = 2B
    transitions) + backward, against the bare denoiser work they cannot avoid, written with a
    plain module call: forward of ``[x_t; x_t]`` (unconditional and text halves of CFG) for the
    same transitions + backward of a scalar.

Runs are warmed up and interleaved; medians of wall clock and process CPU time.

    python benchmarks/bench_online.py               # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import machine, measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow square"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images per collection (prompts x group)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--transitions", type=int, default=16, help="B: transitions (DDPO) / pair-steps (PRDP)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="tiny-sd,tiny-sd3,testbed-sd")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def build_generator(name: str, device: str):
    from visalign.models import load_generator
    from visalign.models.tiny import save_tiny_model

    if name.startswith("tiny-"):
        family = name.split("-", 1)[1]
        folder = save_tiny_model(family, tempfile.mkdtemp(prefix=f"bench-online-{family}-"), seed=0)
    else:
        folder = ROOT / "assets" / "testbed" / name.split("-", 1)[1]
    generator = load_generator(folder, device=device)
    generator.add_lora(rank=4)
    return generator


def collection_runs(generator, args):
    from visalign.algorithms.online import collect_rollout

    eta = 0.7 if generator.is_flow else 1.0
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images // args.group_size)]
    expanded = [p for p in prompts for _ in range(args.group_size)]

    def collect():
        collect_rollout(generator, prompts, args.group_size, num_inference_steps=args.sample_steps,
                        guidance_scale=4.0, eta=eta, seed=0, chunk_size=args.images)

    def plain():
        with torch.no_grad():
            generator.sample(expanded, num_inference_steps=args.sample_steps, guidance_scale=4.0, eta=eta,
                             generator=torch.Generator(generator.device).manual_seed(0))

    return {"collect": collect, "plain": plain}


def step_runs(generator, args):
    import rewards
    from visalign.algorithms.ddpo import DDPO, DDPOOptions
    from visalign.algorithms.online import RewardMix, collect_rollout
    from visalign.algorithms.prdp import PRDP, PRDPOptions

    eta = 0.7 if generator.is_flow else 1.0
    prompts = PROMPTS * 2
    rollout, images = collect_rollout(generator, prompts, 4, num_inference_steps=args.sample_steps, guidance_scale=4.0,
                                      eta=eta, seed=0)
    reward = RewardMix({"brightness": rewards.FunctionReward(lambda i, p: i.mean((1, 2, 3)))}, {"brightness": 1.0})
    rollout.rewards, rollout.components = reward(images, rollout.prompts)
    rollout.selected = torch.ones(len(rollout), dtype=torch.bool)
    common = dict(guidance_scale=4.0, eta=eta, num_inference_steps=args.sample_steps, group_size=4)
    objectives = {"ddpo": DDPO(generator, DDPOOptions(**common)), "prdp": PRDP(generator, PRDPOptions(**common))}
    for objective in objectives.values():
        objective.rollout, objective.batch_size, objective.last = rollout, args.transitions, {}
        objective.items = objective.prepare(rollout, torch.Generator().manual_seed(0))
    parameters = generator.trainable_parameters()
    denoiser = generator.denoiser
    negative = generator.negative_cond(1)

    def zero():
        for p in parameters:
            p.grad = None

    def bare_for(count):
        g = torch.Generator().manual_seed(0)
        samples = torch.randint(len(rollout), (count,), generator=g)
        steps = torch.randint(rollout.num_steps, (count,), generator=g)
        x_t = rollout.latents[samples, steps].to(generator.device)
        t = rollout.timesteps[steps].to(generator.device)
        cond = rollout.cond[samples]
        states = torch.cat([negative.prompt_embeds.expand(count, -1, -1), cond.prompt_embeds])
        pooled = None if cond.pooled_embeds is None else torch.cat(
            [negative.pooled_embeds.expand(count, -1), cond.pooled_embeds])
        x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])

        def bare():
            if generator.is_flow:
                out = denoiser(hidden_states=x_in, timestep=t_in * 1000, encoder_hidden_states=states,
                               pooled_projections=pooled, return_dict=False)[0]
            else:
                out = denoiser(x_in, t_in, encoder_hidden_states=states, return_dict=False)[0]
            out.float().pow(2).mean().backward()
            zero()

        return bare

    def ours(objective):
        def run():
            loss, _ = objective.loss(None, None)
            loss.backward()
            zero()

        return run

    return ({"ddpo": ours(objectives["ddpo"]), "bare B": bare_for(args.transitions)},
            {"prdp": ours(objectives["prdp"]), "bare 2B": bare_for(2 * args.transitions)})


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        generator = build_generator(name, args.device)
        collection = measure(collection_runs(generator, args), args.repeats)
        ddpo_runs, prdp_runs = step_runs(generator, args)
        ddpo = measure(ddpo_runs, args.repeats)
        prdp = measure(prdp_runs, args.repeats)
        rows.append((name, collection, ddpo, prdp))
        print(f"{name}: collect {collection['collect'][0]:.3f} s, plain {collection['plain'][0]:.3f} s; "
              f"ddpo {ddpo['ddpo'][0] * 1e3:.0f} ms vs {ddpo['bare B'][0] * 1e3:.0f}; "
              f"prdp {prdp['prdp'][0] * 1e3:.0f} ms vs {prdp['bare 2B'][0] * 1e3:.0f}", file=sys.stderr, flush=True)
    print(f"\nMachine: {machine()}\n")
    print(f"(a) Collection of {args.images} images, {args.sample_steps} steps, CFG 4, eta 1 (diffusion) / 0.7 (flow)\n")
    print("| model | collect (samples/s) | plain sample (samples/s) | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|")
    for name, c, _, _ in rows:
        print(f"| {name} | {args.images / c['collect'][0]:.2f} | {args.images / c['plain'][0]:.2f} | "
              f"{c['plain'][0] / c['collect'][0]:.3f} | {c['plain'][1] / c['collect'][1]:.3f} |")
    print(f"\n(b) Optimisation step, B = {args.transitions} (DDPO: B transitions; PRDP: B pair-steps = 2B transitions)\n")
    print("| model | DDPO (ms) | bare B (ms) | DDPO / bare (wall) | DDPO / bare (CPU) | PRDP (ms) | bare 2B (ms) "
          "| PRDP / bare (wall) | PRDP / bare (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, d, p in rows:
        print(f"| {name} | {d['ddpo'][0] * 1e3:.1f} | {d['bare B'][0] * 1e3:.1f} | {d['ddpo'][0] / d['bare B'][0]:.3f} | "
              f"{d['ddpo'][1] / d['bare B'][1]:.3f} | {p['prdp'][0] * 1e3:.1f} | {p['bare 2B'][0] * 1e3:.1f} | "
              f"{p['prdp'][0] / p['bare 2B'][0]:.3f} | {p['prdp'][1] / p['bare 2B'][1]:.3f} |")


if __name__ == "__main__":
    main()
