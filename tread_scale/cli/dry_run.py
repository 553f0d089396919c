"""``tread-scale dry-run``: validate a config and sharding plan; parameters, FLOPs, memory per GPU."""

from __future__ import annotations

import argparse
import sys

from tread_scale.cli.common import add_overrides

NAME = "dry-run"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dry-run``."""
    p = sub.add_parser(NAME, help="validate a config and sharding plan; parameters, FLOPs, memory per GPU",
                       intermixed=True)
    add_overrides(p)
    p.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs)")
    p.add_argument("--gpu-memory", help="memory per GPU to check against, e.g. 80GB")
    g = p.add_argument_group("projection", "step time and weak-scaling efficiency from 1 to N nodes")
    g.add_argument("--project", action="store_true", help="add the projection (per-GPU batch as planned here)")
    g.add_argument("--max-nodes", type=int, default=128)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak per GPU (H100 SXM: 989.4)")
    g.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation of the compute")
    g.add_argument("--nvlink-gbps", type=float, default=360.0, help="GB/s per GPU inside a node (NCCL bus bw)")
    g.add_argument("--network-gbps", type=float, default=45.0, help="GB/s per GPU between nodes")
    g.add_argument("--latency-us", type=float, default=5.0, help="per hop of a collective (log2(group) hops)")
    g.add_argument("--overlap", type=float, default=0.8, help="fraction of compute time hiding communication")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan (and the projection with ``--project``)."""
    from tread_scale.config import load_config
    from tread_scale.parallel.plan import dry_run

    projection = None
    if args.project:
        from tread_scale.parallel.scaling import Assumptions

        projection = Assumptions(peak_tflops=args.peak_tflops, mfu=args.mfu, gpus_per_node=args.gpus_per_node,
                                 nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps,
                                 latency_us=args.latency_us, overlap=args.overlap)
    report = dry_run(load_config(args.config, args.overrides), args.world_size, args.gpu_memory, projection,
                     args.max_nodes)
    sys.stdout.write(report + "\n")
    return 0
