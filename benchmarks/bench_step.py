#!/usr/bin/env python
"""Train-step time of a dense DiT (or MMDiT) vs the same network with TREAD routing, measured in one process.

Each round runs one dense and one TREAD step (forward, backward, fused AdamW) on the same batch and the
same network (routing switched off for the dense step), rotating which goes first; after warm-up the
median of the per-round ratios is reported next to the analytic block-FLOP ratio. ``--reference`` adds a
third step per round: the same network routed the way the spec describes the reference doing it
(``benchmarks/reference_style.py``), and reports our TREAD step time over that one. The last line is
machine-readable: ``measured_ratio=<x> flop_ratio=<y>``.

``--model MMDiT-<size>/<patch>`` times the text-to-image MMDiT instead (rectified flow, a random
:class:`TextCondition` of ``--text-len`` T5-width tokens, each prompt padded from a random length), with
``--depth/--width/--heads`` to shrink a registry size to a CPU-sized one; its ``flop_ratio`` is the whole
model's routing-aware FLOP ratio (``models.flops.model_flops``, text tokens in every block).

    python benchmarks/bench_step.py --model B/2 --batch 8 --pairs 15
    python benchmarks/bench_step.py --model B/2 --batch 8 --pairs 11 --reference --bf16
    python benchmarks/bench_step.py --model MMDiT-T/2 --depth 12 --input-size 64 --text-len 128 --batch 2
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
from tread_scale.diffusion.rectified_flow import RectifiedFlow  # noqa: E402
from tread_scale.models import DiT, parse_model_name  # noqa: E402
from tread_scale.models.conditioning import TextCondition  # noqa: E402
from tread_scale.models.flops import model_flops  # noqa: E402
from tread_scale.models.mmdit import MMDiT  # noqa: E402
from tread_scale.models.registry import DiTSize, model_spec  # noqa: E402
from tread_scale.routing import Route, TokenRouter, resolve_routes, routed_block_fraction  # noqa: E402

from reference_style import ReferenceStyleRouting  # noqa: E402  (benchmarks/ is the script's directory)

DEFAULT_ROUTES = {"S": (2, 8), "B": (2, 8), "L": (2, 20), "XL": (2, 24)}


def build(size, patch, routes, device, compile_blocks=False, seed=0, mmdit=False, input_size=32, text_len=128):
    torch.manual_seed(seed)
    if mmdit:
        net = MMDiT(input_size=input_size, patch_size=patch, in_channels=4, hidden_size=size.hidden_size,
                    depth=size.depth, num_heads=size.num_heads, text_len=text_len).to(device)
    else:
        net = DiT(input_size=input_size, patch_size=patch, in_channels=4, hidden_size=size.hidden_size,
                  depth=size.depth, num_heads=size.num_heads, num_classes=1000).to(device)
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
    p.add_argument("--model", default="B/2", help="DiT S|B|L|XL / 2|4|8, or MMDiT-<T|B|L|2B|8B>/<1|2|4|8>")
    p.add_argument("--depth", type=int, help="override the size's depth (e.g. a CPU-sized MMDiT)")
    p.add_argument("--width", type=int, help="override the size's hidden width")
    p.add_argument("--heads", type=int, help="override the size's attention heads")
    p.add_argument("--input-size", type=int, help="latent side (default: 32 for a DiT, 64 for an MMDiT)")
    p.add_argument("--text-len", type=int, default=128, help="MMDiT: padded text tokens per prompt")
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
    mmdit = args.model.startswith("MMDiT-")
    name = args.model if mmdit or args.model.startswith("DiT-") else f"DiT-{args.model}"
    size, patch = (model_spec(name).size, model_spec(name).patch_size) if mmdit else parse_model_name(name)
    size = DiTSize(args.depth or size.depth, args.width or size.hidden_size, args.heads or size.num_heads,
                   size.mlp_ratio)
    if mmdit and args.reference:
        p.error("--reference re-creates the reference's routing of the DiT only")
    input_size = args.input_size or (64 if mmdit else 32)
    # the paper's rule i = 2, j = B - 4 (DiT sizes: the spans the paper and the reference use)
    start, end = (2, size.depth - 4) if mmdit or args.depth else DEFAULT_ROUTES[name[4:].split("/")[0]]
    route = Route(args.rate, args.start if args.start is not None else start, args.end if args.end is not None else end)
    n_tokens = (input_size // patch) ** 2
    resolved = resolve_routes([route], size.depth)

    net, opt = build(size, patch, [route], device, args.compile, mmdit=mmdit, input_size=input_size,
                     text_len=args.text_len)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, 4, input_size, input_size, generator=g) * 0.5).to(device)
    if mmdit:
        flops = model_flops(net, [route])  # text tokens (padding included) pass every block
        flop_ratio = flops.routed / flops.dense
        reference, objective = None, RectifiedFlow()
        lengths = torch.randint(args.text_len // 4, args.text_len + 1, (args.batch,), generator=g)
        mask = torch.arange(args.text_len)[None, :] < lengths[:, None]  # each prompt padded from its own length
        y = TextCondition(torch.randn(args.batch, args.text_len, net.text_dim, generator=g), mask,
                          torch.randn(args.batch, net.pooled_dim, generator=g)).to(device)
    else:
        flop_ratio = routed_block_fraction(resolved, size.depth, n_tokens, size.hidden_size)
        reference, objective = ReferenceStyleRouting(net, resolved), EDM()
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
        for variant in names:
            arms[variant](i)
    times = {variant: [] for variant in names}
    for i in range(args.pairs):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate which variant goes first
        for variant in order:
            times[variant].append(arms[variant](i))
    measured = statistics.median(t / d for t, d in zip(times["tread"], times["dense"]))
    med = {variant: statistics.median(ts) * 1e3 for variant, ts in times.items()}
    text = (f"+{args.text_len} text (valid {int(mask.sum(1).min())}-{int(mask.sum(1).max())}) "
            if mmdit else "")
    print(f"model={name} depth={size.depth} width={size.hidden_size} tokens={n_tokens} {text}batch={args.batch} "
          f"device={device} threads={torch.get_num_threads()} "
          f"route={route.start}->{route.end}@{route.rate} precision={'bf16 autocast' if args.bf16 else 'fp32'} "
          f"compile={'per block' if args.compile else 'off'}")
    print(f"dense step median {med['dense']:.1f} ms, TREAD step median {med['tread']:.1f} ms over {args.pairs} "
          f"interleaved rounds")
    ratios = sorted(t / d for t, d in zip(times["tread"], times["dense"]))
    print(f"per-round TREAD/dense ratios: min {ratios[0]:.3f}, median {measured:.3f}, max {ratios[-1]:.3f}")
    if args.reference:
        vs_ref = statistics.median(t / r for t, r in zip(times["tread"], times["reference"]))
        print(f"reference-style TREAD step median {med['reference']:.1f} ms (clone at route start, argsort draw, "
              f"fp32 block after the route)")
        print(f"ours_vs_reference={vs_ref:.3f}")
    print(f"quotient measured/flop = {measured / flop_ratio:.3f}"
          + (" (flop: whole model, routing-aware)" if mmdit else " (flop: blocks)"))
    print(f"measured_ratio={measured:.3f} flop_ratio={flop_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
