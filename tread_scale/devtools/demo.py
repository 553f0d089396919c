"""``make demo``: the whole pipeline on embedded data, on a CPU, in a few minutes.

1. start an S3-compatible server (moto) on 127.0.0.1;
2. ``tread-scale convert demo`` → MDS shards at ``s3://tread-demo/shapes``;
3. stream them into TREAD training of a tiny DiT (``yamls/demo.yaml``), with checkpoints, EMA weights and
   sample grids under ``runs/demo/``;
4. sample a final grid from the exported EMA weights;
5. print where every output is, and stop the server.

The demo starts over each time (``runs/demo`` is replaced). Extra ``key=value`` arguments override the yaml.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from tread_scale.log_setup import setup_logging

log = logging.getLogger("tread_scale.demo")
REPO = Path(__file__).resolve().parents[2]
BUCKET = "tread-demo"
DATA = f"s3://{BUCKET}/shapes"


def main(argv: list[str] | None = None) -> int:
    from tread_scale.config import load_config
    from tread_scale.data.convert import ConvertOptions, convert
    from tread_scale.data.demo import DEMO_NUM_SAMPLES
    from tread_scale.data.sources import DemoSource
    from tread_scale.devtools import local_s3
    from tread_scale.diffusion.guidance import Guidance
    from tread_scale.sampling import sample_to_folder
    from tread_scale.trainer.builder import train

    setup_logging("INFO")
    overrides = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    cfg = load_config(REPO / "yamls" / "demo.yaml", [f"data.remote={DATA}", *overrides])
    if cfg.run_dir.exists():
        log.info("removing the previous demo run at %s", cfg.run_dir)
        shutil.rmtree(cfg.run_dir)
    with local_s3.start("moto", log_dir=REPO / ".cache") as server:
        os.environ.update(server.client_env())
        server.create_bucket(BUCKET)
        log.info("S3 server (moto) at %s, bucket %s", server.endpoint, BUCKET)
        t_data = time.time()
        source = DemoSource(num_samples=DEMO_NUM_SAMPLES, resolution=cfg.model.input_size,
                            num_classes=cfg.model.num_classes)
        meta = convert(source, DATA, ConvertOptions(processes=2, shard_size="1mb", progress=False))
        t_train = time.time()
        result = train(cfg)
        train_seconds = time.time() - t_train
        final = sample_to_folder(str(result.run_dir), str(result.run_dir / "final"), num=4 * meta.num_classes,
                                 steps=cfg.sampling.steps, guidance=Guidance(cfg_scale=2.0), device="cpu")
    total = time.time() - t0
    ckpt = Path(result.checkpoint_folder) / "latest-rank0.pt"
    lines = [
        "",
        "tread_scale demo finished",
        f"  dataset (MDS in S3)   {DATA}  ({meta.num_samples} samples, {t_train - t_data:.0f} s to convert)",
        f"  training              {result.batches} batches in {train_seconds:.0f} s (TREAD route "
        f"{cfg.routing.routes[0].start}->{cfg.routing.routes[0].end} at rate {cfg.routing.routes[0].rate})",
        f"  checkpoint            {ckpt.resolve() if ckpt.exists() else result.checkpoint_folder}",
        f"  EMA weights           {result.ema_weights}",
        f"  sample grid (train)   {result.sample_grid}",
        f"  sample grid (final)   {final['grid']}  (CFG 2.0; columns are classes)",
        f"  samples (.npz)        {final['npz']}",
        f"  total                 {total:.0f} s",
        "",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
