#!/usr/bin/env python
"""The training loader with aspect-ratio buckets against square data: latents/s and tokens/s, one run.

Writes two MDS datasets of ``--samples`` random float16 latents each: *square* (all 4×32×32, the 256² SD-VAE
shape) and *bucketed* (a third each 4×32×32, 4×24×40 and 4×40×24, SDXL-style buckets of about the same
area, laid out as ``convert --buckets`` writes them). Then times ``--passes`` passes of the training loader
(a batched ``LatentStreamingDataset`` in a ``BatchLoader``, as ``build_dataloader`` makes it) over each,
alternating, after one warm-up pass each. The last line is machine-readable:
``square_per_s=<x> bucketed_per_s=<y> ratio=<y/x> token_ratio=<z>`` (ratio: bucketed / square latents per
second; token_ratio the same in latent pixels per second).

    python benchmarks/bench_buckets.py --samples 12000 --workers 2 --batch 256
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import loader_args  # noqa: E402
from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset  # noqa: E402
from tread_scale.devtools.synthetic import write_bucketed_latents  # noqa: E402

SQUARE = (4, 32, 32)
BUCKETS = [(4, 32, 32), (4, 24, 40), (4, 40, 24)]


def one_pass(loader) -> tuple[float, float]:
    """(latents/s, latent pixels/s) of one whole pass."""
    t0, seen, pixels = time.perf_counter(), 0, 0
    for batch in loader:
        n, _, h, w = batch["latent"].shape
        seen, pixels = seen + n, pixels + n * h * w
    dt = time.perf_counter() - t0
    return seen / dt, pixels / dt


def main() -> None:
    args = loader_args(__doc__, 12000)
    from streaming.base.util import clean_stale_shared_memory

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        per = args.samples // len(BUCKETS)
        write_bucketed_latents(Path(tmp, "square"), [(SQUARE, per * len(BUCKETS))], num_classes=1000,
                               shard_size="64mb")
        buckets = write_bucketed_latents(Path(tmp, "bucketed"), [(s, per) for s in BUCKETS], num_classes=1000,
                                         shard_size="64mb")
        print(f"wrote {per * len(BUCKETS)} latents twice in {time.perf_counter() - t0:.0f} s")
        loaders = {}
        for name, extra in (("square", {}), ("bucketed", {"buckets": buckets})):
            clean_stale_shared_memory()
            ds = LatentStreamingDataset(latent_shape=SQUARE, num_classes=1000, local=str(Path(tmp, name)),
                                        batch_size=args.batch, shuffle=True, num_canonical_nodes=1, batched=True,
                                        **extra)
            loaders[name] = BatchLoader(ds, num_workers=args.workers, persistent_workers=args.workers > 0,
                                        prefetch_factor=4 if args.workers > 0 else None)
        rates = {name: [] for name in loaders}
        for i in range(args.passes + 1):
            for name, loader in loaders.items():
                rate = one_pass(loader)
                if i:  # the first pass warms the page cache and starts the workers
                    rates[name].append(rate)
    med = statistics.median
    sq, bk = ([med(r[k] for r in rates[name]) for k in (0, 1)] for name in ("square", "bucketed"))
    print(f"batch {args.batch}, {args.workers} workers, median of {args.passes} alternating passes of "
          f"{per * len(BUCKETS)} latents, shuffled")
    print(f"{'':24}{'latents/s':>12}{'latent px/s':>14}")
    print(f"{'square 4x32x32:':24}{sq[0]:12.0f}{sq[1]:14.3g}")
    print(f"{'3 buckets (32², 24x40):':24}{bk[0]:12.0f}{bk[1]:14.3g}")
    print(f"square_per_s={sq[0]:.0f} bucketed_per_s={bk[0]:.0f} ratio={bk[0] / sq[0]:.2f} "
          f"token_ratio={bk[1] / sq[1]:.2f}")


if __name__ == "__main__":
    main()
