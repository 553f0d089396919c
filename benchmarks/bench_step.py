#!/usr/bin/env python
"""Train-step time of a dense DiT vs the same DiT with TREAD routing, measured in one process.

Each pair runs one dense and one TREAD step (forward, backward, AdamW) on the same batch, alternating which
goes first; after warm-up the median of the per-pair ratios is reported next to the analytic block-FLOP
ratio. The last line is machine-readable: ``measured_ratio=<x> flop_ratio=<y>``.

    python benchmarks/bench_step.py --model B/2 --batch 8 --pairs 15
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

DEFAULT_ROUTES = {"S": (2, 8), "B": (2, 8), "L": (2, 20), "XL": (2, 24)}


def build(size, patch, routes, device, seed=0):
    torch.manual_seed(seed)
    net = DiT(input_size=32, patch_size=patch, in_channels=4, hidden_size=size.hidden_size, depth=size.depth,
              num_heads=size.num_heads, num_classes=1000).to(device)
    if routes:
        net.attach_router(TokenRouter(routes, seed=seed))
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
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size, patch = parse_model_name(f"DiT-{args.model}")
    start, end = DEFAULT_ROUTES[args.model.split("/")[0]]
    route = Route(args.rate, args.start if args.start is not None else start, args.end if args.end is not None else end)
    n_tokens = (32 // patch) ** 2
    flop_ratio = routed_block_fraction(resolve_routes([route], size.depth), size.depth, n_tokens, size.hidden_size)

    dense, dense_opt = build(size, patch, [], device)
    tread, tread_opt = build(size, patch, [route], device)
    objective = EDM()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, 4, 32, 32, generator=g) * 0.5).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    def run_dense(i):
        return timed(lambda: step(dense, dense_opt, objective, x, y, i, device, args.bf16), device)

    def run_tread(i):
        return timed(lambda: step(tread, tread_opt, objective, x, y, i, device, args.bf16), device)

    for i in range(args.warmup):
        run_dense(i), run_tread(i)
    ratios, dense_t, tread_t = [], [], []
    for i in range(args.pairs):
        if i % 2:
            td, tt = run_dense(i), run_tread(i)
        else:
            tt, td = run_tread(i), run_dense(i)
        dense_t.append(td)
        tread_t.append(tt)
        ratios.append(tt / td)
    measured = statistics.median(ratios)
    print(f"model=DiT-{args.model} tokens={n_tokens} batch={args.batch} device={device} threads={torch.get_num_threads()} "
          f"route={route.start}->{route.end}@{route.rate}")
    print(f"dense step median {statistics.median(dense_t) * 1e3:.1f} ms, TREAD step median "
          f"{statistics.median(tread_t) * 1e3:.1f} ms over {args.pairs} interleaved pairs")
    print(f"quotient measured/flop = {measured / flop_ratio:.3f}")
    print(f"measured_ratio={measured:.3f} flop_ratio={flop_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
