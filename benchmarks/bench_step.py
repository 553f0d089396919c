#!/usr/bin/env python
"""Train-step time of a dense DiT vs the same DiT with TREAD routing, measured in one process.

Each round runs one dense and one TREAD step (forward, backward, fused AdamW) on the same batch and the
same network (routing switched off for the dense step), rotating which goes first; after warm-up the
median of the per-round ratios is reported next to the analytic block-FLOP ratio. ``--reference`` adds a
third step per round: the same network routed the way the spec describes the reference doing it
(``benchmarks/reference_style.py``), and reports our TREAD step time over that one. The last line is
machine-readable: ``measured_ratio=<x> flop_ratio=<y>``.

    python benchmarks/bench_step.py --model B/2 --batch 8 --pairs 15
    python benchmarks/bench_step.py --model B/2 --batch 8 --pairs 11 --reference --bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tread_scale.diffusion.edm import EDM  # noqa: E402
from tread_scale.models import DiT, parse_model_name  # noqa: E402
from tread_scale.routing import Route, TokenRouter, resolve_routes, routed_block_fraction  # noqa: E402

from reference_style import ReferenceStyleRouting  # noqa: E402  (benchmarks/ is the script's directory)

DEFAULT_ROUTES = {"S": (2, 8), "B": (2, 8), "L": (2, 20), "XL": (2, 24)}


def build(size, patch, routes, device, compile_blocks=False, seed=0):
    torch.manual_seed(seed)
    net = DiT(input_size=32, patch_size=patch, in_channels=4, hidden_size=size.hidden_size, depth=size.depth,
              num_heads=size.num_heads, num_classes=1000).to(device)
    if routes:
        net.attach_router(TokenRouter(routes, seed=seed))
    if compile_blocks:
        for block in net.blocks:  # per block, as train.compile does (and as the reference decorates its blocks)
            block.compile()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)  # as training uses it, on CPU too
    return net, opt


def step(net, opt, objective, x, y, gen_seed, device, autocast):
    gen = torch.Generator(device=device).manual_seed(gen_seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = objective.training_loss(net, x, y, net.null_label, generator=gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="B/2", help="S|B|L|XL / 2|4|8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--start", type=int, help="route start (default: 2)")
    p.add_argument("--end", type=int, help="route end (default: the paper's B-4 rule)")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU; also CPUs with bf16 instructions)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (all variants)")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference's routing mechanics on the same network (reference_style.py)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size, patch = parse_model_name(f"DiT-{args.model}")
    start, end = DEFAULT_ROUTES[args.model.split("/")[0]]
    route = Route(args.rate, args.start if args.start is not None else start, args.end if args.end is not None else end)
    n_tokens = (32 // patch) ** 2
    resolved = resolve_routes([route], size.depth)
    flop_ratio = routed_block_fraction(resolved, size.depth, n_tokens, size.hidden_size)

    net, opt = build(size, patch, [route], device, args.compile)
    reference = ReferenceStyleRouting(net, resolved)
    objective = EDM()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, 4, 32, 32, generator=g) * 0.5).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    def arm(model, routed):
        def run(i):
            net.router.enabled = routed
            return timed(lambda: step(model, opt, objective, x, y, i, device, args.bf16), device)
        return run

    arms = {"dense": arm(net, False), "tread": arm(net, True)}
    if args.reference:
        arms["reference"] = arm(reference, True)
    names = list(arms)
    for i in range(args.warmup):
        for name in names:
            arms[name](i)
    times = {name: [] for name in names}
    for i in range(args.pairs):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate which variant goes first
        for name in order:
            times[name].append(arms[name](i))
    measured = statistics.median(t / d for t, d in zip(times["tread"], times["dense"]))
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"model=DiT-{args.model} tokens={n_tokens} batch={args.batch} device={device} threads={torch.get_num_threads()} "
          f"route={route.start}->{route.end}@{route.rate} precision={'bf16 autocast' if args.bf16 else 'fp32'} "
          f"compile={'per block' if args.compile else 'off'}")
    print(f"dense step median {med['dense']:.1f} ms, TREAD step median {med['tread']:.1f} ms over {args.pairs} "
          f"interleaved rounds")
    if args.reference:
        vs_ref = statistics.median(t / r for t, r in zip(times["tread"], times["reference"]))
        print(f"reference-style TREAD step median {med['reference']:.1f} ms (clone at route start, argsort draw, "
              f"fp32 block after the route)")
        print(f"ours_vs_reference={vs_ref:.3f}")
    print(f"quotient measured/flop = {measured / flop_ratio:.3f}")
    print(f"measured_ratio={measured:.3f} flop_ratio={flop_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
