"""``tread-scale convert {demo,npy,images}``: write MDS shards of latents (local folder or ``s3://``)."""

from __future__ import annotations

import argparse
import logging

from tread_scale.data.demo import DEMO_NUM_CLASSES, DEMO_NUM_SAMPLES, DEMO_RESOLUTION

NAME = "convert"
log = logging.getLogger(__name__)


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    q.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    q.add_argument("--group-size", type=int, default=20000, help="samples per resumable group")
    q.add_argument("--shard-size", default="64mb", help="MDS shard size limit (default 64mb)")
    q.add_argument("--compression", default="zstd", help="MDS compression: zstd (default) or none")
    q.add_argument("--work-dir", help="staging folder for s3:// outputs (kept; reruns resume from it)")
    q.add_argument("--overwrite", action="store_true", help="replace an output holding another conversion")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``convert`` and its three sources."""
    p = sub.add_parser(NAME, help="write MDS shards of latents (local folder or s3://bucket/prefix)")
    srcs = p.add_subparsers(dest="source", required=True)

    demo = srcs.add_parser("demo", help="the built-in procedural shapes dataset (pixel space; fits yamls/demo.yaml)")
    demo.add_argument("--num-samples", type=int, default=DEMO_NUM_SAMPLES)
    demo.add_argument("--resolution", type=int, default=DEMO_RESOLUTION,
                      help=f"image side (default {DEMO_RESOLUTION}: yamls/demo.yaml's model.input_size)")
    demo.add_argument("--num-classes", type=int, default=DEMO_NUM_CLASSES)
    demo.add_argument("--seed", type=int, default=0)
    _common(demo)

    npy = srcs.add_parser("npy", help="a folder of .npy/.npz latents with labels")
    npy.add_argument("folder")
    npy.add_argument("--num-classes", type=int, help="number of classes (default: max label + 1)")
    _common(npy)

    img = srcs.add_parser("images", help="an image folder with one subfolder per class, encoded by a VAE")
    img.add_argument("folder")
    img.add_argument("--vae", required=True, help="local AutoencoderKL folder (save_pretrained), or 'none' for pixels")
    img.add_argument("--resolution", type=int, default=256)
    img.add_argument("--batch-size", type=int, default=32)
    img.add_argument("--seed", type=int, default=0)
    img.add_argument("--device", default="cpu")
    _common(img)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert the chosen source; logs what the dataset holds."""
    from tread_scale.data.convert import ConvertOptions, convert
    from tread_scale.data.sources import DemoSource, ImageFolderSource, NpyFolderSource

    if args.source == "demo":
        source = DemoSource(num_samples=args.num_samples, resolution=args.resolution, seed=args.seed,
                            num_classes=args.num_classes)
    elif args.source == "npy":
        source = NpyFolderSource(folder=args.folder, num_classes=args.num_classes)
    else:
        source = ImageFolderSource(folder=args.folder, resolution=args.resolution, vae=args.vae,
                                   batch_size=args.batch_size, seed=args.seed, device=args.device)
    opts = ConvertOptions(processes=args.processes, group_size=args.group_size, shard_size=args.shard_size,
                          compression=args.compression, work_dir=args.work_dir, overwrite=args.overwrite,
                          progress=not args.no_progress)
    meta = convert(source, args.out, opts)
    log.info("dataset at %s: %d samples of shape %s, %d classes", args.out, meta.num_samples,
             tuple(meta.latent_shape), meta.num_classes)
    return 0
