#!/usr/bin/env python
"""Latents/s through the training loader: MDS shards in a local cache vs one ``.npy`` file per sample.

Writes ``--samples`` random latents (4×32×32, the 256² SD-VAE shape) twice — as an MDS dataset through
``tread-scale convert`` (fp16, zstd) and as one fp32 ``.npy`` file per sample with a labels file, the layout
most ``train.py`` scripts read — then times passes of the training loader over the MDS copy (what
``build_dataloader`` makes: a batched ``LatentStreamingDataset`` in a ``BatchLoader``) and of a shuffling
``DataLoader`` over the files, with the same batch size, workers and pinned memory (when CUDA is present). The first pass warms the page cache and is not
counted. Each pass is reported whole and in its steady state (after its first batch, see
:func:`passes`). The last line is machine-readable (whole passes):
``mds_per_s=<x> npy_per_s=<y> ratio=<x/y> steady_ratio=<z>``.

    python benchmarks/bench_data.py --samples 20000 --workers 2 --batch 256
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tread_scale.data.conversion.writer import ConvertOptions, convert  # noqa: E402
from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset, collate_latents  # noqa: E402
from tread_scale.data.conversion.sources import NpyFolderSource  # noqa: E402

SHAPE = (4, 32, 32)
CLASSES = 1000


class PerFileNpy(Dataset):
    """The usual baseline: ``np.load`` of one fp32 file per sample, labels from one array."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.npy"))
        self.labels = np.load(folder.parent / "labels.npy")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"latent": torch.from_numpy(np.load(self.files[i])), "label": torch.tensor(int(self.labels[i])),
                "id": i}


def write_data(root: Path, n: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    per_file = root / "npy" / "latents"
    per_file.mkdir(parents=True)
    labels = rng.integers(0, CLASSES, n)
    np.save(root / "npy" / "labels.npy", labels)
    batched = root / "src"
    batched.mkdir()
    chunk = 2048
    for start in range(0, n, chunk):
        lat = rng.standard_normal((min(chunk, n - start), *SHAPE)).astype(np.float32)
        for j, x in enumerate(lat):
            np.save(per_file / f"{start + j:08d}.npy", x)
        np.savez(batched / f"part{start // chunk:05d}.npz", latents=lat, labels=labels[start:start + len(lat)])
    mds = root / "mds"
    convert(NpyFolderSource(folder=str(batched)), str(mds), ConvertOptions(progress=False))
    return mds, per_file


def loader(dataset, args) -> DataLoader:
    """The training loader (what ``build_dataloader`` makes) for MDS; a shuffling batching one for ``.npy``."""
    common = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers > 0 else None)
    if isinstance(dataset, LatentStreamingDataset):
        return BatchLoader(dataset, **common)
    return DataLoader(dataset, batch_size=args.batch, collate_fn=collate_latents, drop_last=True, shuffle=True,
                      **common)


def passes(dl: DataLoader, count: int) -> tuple[list[float], list[float]]:
    """Rates of ``count`` whole passes and of their steady state (from each pass's first batch to its end).

    A pass starts by restarting the workers' iteration: streaming partitions and shuffles the epoch and
    its workers meet at a barrier (about 0.1 s here), once per epoch. Whole passes over a short dataset
    overweight that; the steady rate is what a long epoch sees.
    """
    whole, steady = [], []
    for i in range(count + 1):
        t0, seen, first = time.perf_counter(), 0, None
        for batch in dl:
            seen += batch["latent"].shape[0]
            if first is None:
                first, after_first = time.perf_counter(), seen
        if i:  # the first pass warms the page cache and starts the workers
            end = time.perf_counter()
            whole.append(seen / (end - t0))
            steady.append((seen - after_first) / (end - first))
    return whole, steady


def loader_args(doc: str, samples: int) -> argparse.Namespace:
    """The options of the loader benchmarks (this one and ``bench_buckets.py``), parsed; logging at WARNING."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--dir", help="where to write the data (default: a temporary folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    return args


def main() -> None:
    args = loader_args(__doc__, 20000)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        mds, per_file = write_data(Path(tmp), args.samples)
        print(f"wrote {args.samples} latents {SHAPE} both ways in {time.perf_counter() - t0:.0f} s")
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        ds = LatentStreamingDataset(latent_shape=SHAPE, num_classes=CLASSES, local=str(mds), remote=None,
                                    batch_size=args.batch, shuffle=True, num_canonical_nodes=1, batched=True)
        mds_whole, mds_steady = passes(loader(ds, args), args.passes)
        npy_whole, npy_steady = passes(loader(PerFileNpy(per_file), args), args.passes)
    med = statistics.median
    print(f"batch {args.batch}, {args.workers} workers, {args.passes} timed passes of {args.samples} (median), "
          "shuffled both")
    print(f"{'':32}{'whole pass':>12}{'steady':>12}   latents/s")
    print(f"{'MDS (fp16, zstd, local cache):':32}{med(mds_whole):12.0f}{med(mds_steady):12.0f}")
    print(f"{'one .npy per sample (fp32):':32}{med(npy_whole):12.0f}{med(npy_steady):12.0f}")
    print(f"steady ratio {med(mds_steady) / med(npy_steady):.2f}")
    mds_rate, npy_rate = med(mds_whole), med(npy_whole)
    print(f"mds_per_s={mds_rate:.0f} npy_per_s={npy_rate:.0f} ratio={mds_rate / npy_rate:.2f} "
          f"steady_ratio={med(mds_steady) / med(npy_steady):.2f}")

if __name__ == "__main__":
    main()
