#!/usr/bin/env python
"""Per-rank peak memory of DDP, FSDP2 (reshard after forward) and DeepSpeed ZeRO-3 on 2 CPU ranks.

One run trains the same model for 3 steps under each backend (``composer -n 2``, gloo). Each rank records
its resident memory after every backward pass and optimizer step (the training state is then live:
parameters, gradients, optimizer state, EMA, activations), above its baseline taken after imports and
before the model exists; set-up and checkpoint writing are excluded (freed set-up memory is handed back
to the OS with ``malloc_trim`` when training starts). The peak over steps is printed next to
``tread-scale dry-run``'s estimate for the same plan, then the ratios to DDP.

    python benchmarks/bench_memory.py --model B/2        # DiT-XL/2 and L/2 do not fit DDP x 2 in 24 GB

The last line is machine-readable: ``fsdp_over_ddp=<x> zero3_over_ddp=<y>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = {
    "ddp": ["parallelism.backend=ddp"],
    "fsdp": ["parallelism.backend=fsdp", "parallelism.fsdp.reshard_after_forward=true"],
    "zero3": ["parallelism.backend=deepspeed", "parallelism.deepspeed.zero_stage=3"],
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> int:
    import ctypes

    from composer.core import Callback

    from tread_scale.config import load_config
    from tread_scale.trainer.builder import build_trainer

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    baseline = rss_bytes()

    class StepMemory(Callback):
        peak = 0

        def fit_start(self, state, logger):
            libc.malloc_trim(0)

        def after_backward(self, state, logger):
            StepMemory.peak = max(StepMemory.peak, rss_bytes())

        def batch_end(self, state, logger):
            StepMemory.peak = max(StepMemory.peak, rss_bytes())

    cfg = load_config(args.config, args.overrides)
    trainer, _ = build_trainer(cfg)
    trainer.state.callbacks.insert(0, StepMemory())
    trainer.fit()
    peak = StepMemory.peak
    trainer.close()
    rank = int(os.environ.get("RANK", "0"))
    with open(args.out, "a") as f:
        f.write(json.dumps({"rank": rank, "peak_above_baseline": peak - baseline}) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="B/2")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import numpy as np
    import torch
    import yaml

    from tread_scale.config import load_config
    from tread_scale.data.conversion.writer import ConvertOptions, convert
    from tread_scale.data.conversion.sources import NpyFolderSource
    from tread_scale.factory import build_dit
    from tread_scale.parallel.memory import GiB, estimate_memory

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rng = np.random.default_rng(0)
    (tmp / "src").mkdir()
    np.savez(tmp / "src" / "b.npz", latents=rng.standard_normal((16, 4, 32, 32)).astype(np.float32),
             labels=rng.integers(0, 1000, 16))
    convert(NpyFolderSource(folder=str(tmp / "src"), num_classes=1000), str(tmp / "mds"), ConvertOptions(progress=False))
    cfg = {"run_name": "mem", "output_dir": str(tmp / "runs"), "model": {"name": f"DiT-{args.model}"},
           "routing": {"routes": [{"rate": 0.5, "start": 2, "end": -4}]},
           "data": {"remote": str(tmp / "mds"), "num_workers": 0},
           "train": {"max_duration": "3ba", "global_batch_size": 2, "device": "cpu", "precision": "fp32",
                     "save_interval": "1000ba", "autoresume": False},
           "sampling": {"every": None, "at_fit_end": False}, "logging": {"progress_bar": False}}
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    composer = Path(sys.executable).with_name("composer")
    results = {}
    for name, overrides in BACKENDS.items():
        out = tmp / f"{name}.jsonl"
        cmd = [str(composer), "-n", "2", __file__, "--worker", "--config", str(cfg_path), "--out", str(out),
               *overrides, f"run_name={name}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode
        ranks = [json.loads(line) for line in out.read_text().splitlines()]
        run_cfg = load_config(cfg_path, overrides)
        with torch.device("meta"):
            net = build_dit(run_cfg.model)
        est = estimate_memory(run_cfg, net, 2, 1, gpu=False)
        results[name] = (max(r["peak_above_baseline"] for r in ranks), est)
        print(f"{name:6s} measured peak/rank {results[name][0] / GiB:6.2f} GiB   estimate {est.total / GiB:6.2f} GiB "
              f"(training state {est.training_state / GiB:.2f})   measured/estimate "
              f"{results[name][0] / est.total:.2f}", flush=True)
    ddp = results["ddp"][0]
    print(f"fsdp_over_ddp={results['fsdp'][0] / ddp:.3f} zero3_over_ddp={results['zero3'][0] / ddp:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
