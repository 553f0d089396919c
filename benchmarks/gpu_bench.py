#!/usr/bin/env python
"""GPU throughput of DiT-XL/2, dense vs TREAD: bf16, SDPA (flash), torch.compile on/off, FSDP2 on one GPU.

One process, one GPU. Each variant trains ``--warmup`` steps (compilation happens there), then ``--steps``
timed steps (forward, backward, fused AdamW) on a fixed batch of 4×32×32 latents; it prints the median
step time, images/s, peak memory and MFU (model FLOPs, routing-aware, per second over the chip's dense
bf16 peak). The table's last column is TREAD/dense step time within each pair of variants.

Compilation is per block (``block.compile()``): routing changes the sequence length between the dense
blocks and the routed span, so each block sees at most two shapes: the first compile is static, the
change of length recompiles once (dynamo makes that graph dynamic in the length); the gather/scatter
between blocks stays eager.

Variant ``reference`` routes the same network the way the spec describes the reference doing it (clone at
route start, argsort draw, the block after the route in fp32: ``reference_style.py``); it prints our TREAD
step time over that one.

    benchmarks/gpu_bench.sh                 # all variants, < 8 minutes on an H100
    python benchmarks/gpu_bench.py --variants dense,tread --batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import DEFAULT_ROUTES, build, step  # noqa: E402
from reference_style import ReferenceStyleRouting  # noqa: E402
from tread_scale.diffusion.edm import EDM  # noqa: E402
from tread_scale.models import parse_model_name  # noqa: E402
from tread_scale.parallel.process_group import leave_process_group  # noqa: E402
from tread_scale.routing import Route  # noqa: E402
from tread_scale.models.flops import model_flops  # noqa: E402

#: Dense bf16 tensor-core peak FLOP/s per chip (vendor datasheets, without sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362.05e12,
             "B200": 2250e12}
VARIANTS = ["dense", "tread", "reference", "dense+compile", "tread+compile", "dense+fsdp2", "tread+fsdp2"]


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name().upper()
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def routes_of(variant: str, route: Route) -> list[Route]:
    """The routes a variant trains with: ``tread*`` and ``reference`` route, ``dense*`` does not."""
    return [route] if variant.startswith(("tread", "reference")) else []


def prepare(variant: str, size, patch: int, route: Route, device: torch.device):
    net, opt = build(size, patch, routes_of(variant, route), device, compile_blocks="compile" in variant)
    if variant == "reference":  # the reference's routing mechanics on the same network (reference_style.py)
        return ReferenceStyleRouting(net, net.router.resolved), opt
    if "fsdp2" in variant:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
        low = torch.bfloat16 if device.type == "cuda" else torch.float32  # the CPU smoke test runs fp32
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for block in net.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(net, mp_policy=mp)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    return net, opt


def measure(variant, net, opt, x, y, warmup: int, steps: int, device) -> dict:
    objective = EDM()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup):
        step(net, opt, objective, x, y, i, device, autocast=cuda)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(net, opt, objective, x, y, warmup + i, device, autocast=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            step(net, opt, objective, x, y, warmup + i, device, autocast=False)
            times.append(time.perf_counter() - t)
    return {"variant": variant, "step_s": statistics.median(times), "warmup_s": warm_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="XL/2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--peak-tflops", type=float, help="override the chip's dense bf16 peak (TFLOP/s)")
    p.add_argument("--cpu-smoke", action="store_true", help="run the code paths on the CPU in fp32 (tests only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    size, patch = parse_model_name(f"DiT-{args.model}")
    start, end = DEFAULT_ROUTES[args.model.split("/")[0]]
    route = Route(args.rate, start, end)
    peak = peak_flops(args.peak_tflops) if device.type == "cuda" or args.peak_tflops else None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.batch, 4, 32, 32, generator=g) * 0.5).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, DiT-{args.model}, batch {args.batch}, "
          f"route {start}->{end} @ {args.rate}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s",
          flush=True)
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
        net, opt = prepare(variant, size, patch, route, device)
        flops = model_flops(getattr(net, "net", net), routes_of(variant, route))
        per_image = flops.train_routed
        r = measure(variant, net, opt, x, y, args.warmup, args.steps, device)
        r["img_s"] = args.batch / r["step_s"]
        r["tflops"] = r["img_s"] * per_image / 1e12
        r["mfu"] = r["img_s"] * per_image / peak if peak else float("nan")
        rows.append(r)
        print(f"{variant:>15}: step {r['step_s'] * 1e3:7.1f} ms  {r['img_s']:7.1f} img/s  {r['tflops']:6.1f} TFLOP/s  "
              f"MFU {r['mfu']:.3f}  peak mem {r['peak_gib']:5.1f} GiB  (warm-up {r['warmup_s']:.0f} s)", flush=True)
        del net, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {r["variant"]: r for r in rows}
    for suffix in ("", "+compile", "+fsdp2"):
        d, t = by.get("dense" + suffix), by.get("tread" + suffix)
        if d and t:
            print(f"tread/dense step time{suffix or ' (eager)'}: {t['step_s'] / d['step_s']:.3f}")
    if "tread" in by and "reference" in by:
        print(f"tread/reference step time (eager): {by['tread']['step_s'] / by['reference']['step_s']:.3f}")
    print("RESULT " + " ".join(f"{r['variant']}:img_s={r['img_s']:.1f},mfu={r['mfu']:.3f},mem={r['peak_gib']:.1f}"
                               for r in rows))
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
