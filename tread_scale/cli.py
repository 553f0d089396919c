"""The ``tread-scale`` command: ``convert``, ``train``, ``sample``, ``dry-run``, ``fid``, ``export``,
``import-dit``, ``plot``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tread_scale.errors import TreadScaleError
from tread_scale.log_setup import setup_logging

log = logging.getLogger("tread_scale.cli")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write MDS shards of latents (local folder or s3://bucket/prefix)")
    srcs = p.add_subparsers(dest="source", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
        q.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
        q.add_argument("--group-size", type=int, default=20000, help="samples per resumable group")
        q.add_argument("--shard-size", default="64mb", help="MDS shard size limit (default 64mb)")
        q.add_argument("--compression", default="zstd", help="MDS compression: zstd (default) or none")
        q.add_argument("--work-dir", help="staging folder for s3:// outputs (kept; reruns resume from it)")
        q.add_argument("--overwrite", action="store_true", help="replace an output holding another conversion")
        q.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    demo = srcs.add_parser("demo", help="the built-in procedural shapes dataset (pixel space)")
    demo.add_argument("--num-samples", type=int, default=4096)
    demo.add_argument("--resolution", type=int, default=32)
    demo.add_argument("--num-classes", type=int, default=6)
    demo.add_argument("--seed", type=int, default=0)
    common(demo)

    npy = srcs.add_parser("npy", help="a folder of .npy/.npz latents with labels")
    npy.add_argument("folder")
    npy.add_argument("--num-classes", type=int, help="number of classes (default: max label + 1)")
    common(npy)

    img = srcs.add_parser("images", help="an image folder with one subfolder per class, encoded by a VAE")
    img.add_argument("folder")
    img.add_argument("--vae", required=True, help="local AutoencoderKL folder (save_pretrained), or 'none' for pixels")
    img.add_argument("--resolution", type=int, default=256)
    img.add_argument("--batch-size", type=int, default=32)
    img.add_argument("--seed", type=int, default=0)
    img.add_argument("--device", default="cpu")
    common(img)


def _run_convert(args: argparse.Namespace) -> int:
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train from a yaml config with key=value overrides")
    p.add_argument("config", help="yaml file (see yamls/)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. routing.routes[0].rate=0.5")


def _run_train(args: argparse.Namespace) -> int:
    from tread_scale.config import load_config
    from tread_scale.trainer.builder import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    log.info("finished %d batches; run folder %s; checkpoints %s; EMA weights %s; samples %s", result.batches,
             result.run_dir, result.checkpoint_folder, result.ema_weights, result.sample_grid)
    return 0


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample a PNG grid and an .npz from exported EMA weights")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--labels", help="comma-separated labels (default: cycle through the classes)")
    _add_guidance_args(p)


def _guidance(args: argparse.Namespace):
    from tread_scale.diffusion.guidance import Guidance

    return Guidance(cfg_scale=args.cfg_scale, tread_scale=args.tread_scale, strong_rate=args.strong_rate,
                    weak_rate=args.weak_rate, tread_drop_label=args.tread_drop_label,
                    interval=tuple(args.interval) if args.interval else None)


def _run_sample(args: argparse.Namespace) -> int:
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.sample_cli import sample_to_folder

    labels = [int(x) for x in args.labels.split(",")] if args.labels else None
    with launched_process_group():
        out = sample_to_folder(args.weights, args.out, num=args.num, seed=args.seed, labels=labels,
                               steps=args.steps, guidance=_guidance(args), vae=args.vae, batch_size=args.batch_size,
                               device=args.device)
    if out:
        log.info("wrote %s and %s", out["grid"], out["npz"])
    return 0


def _add_guidance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--tread-scale", type=float, help="TREAD guidance scale (off when not given)")
    p.add_argument("--strong-rate", type=float, default=0.3, help="routing rate of the strong branch")
    p.add_argument("--weak-rate", type=float, default=0.7, help="routing rate of the weak branch")
    p.add_argument("--tread-drop-label", action="store_true", help="null label in TREAD branches (reference bug)")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LOW", "HIGH"), help="guide only within this σ/t range")
    p.add_argument("--vae", help="local AutoencoderKL folder to decode latents")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (keep it fixed to compare runs)")
    p.add_argument("--device", default="auto")


def _add_fid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fid", help="FID (and sFID, IS, precision/recall) of generated samples, across ranks")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--inception", required=True, help="local FID Inception weights (.pth state dict or .safetensors)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="reference statistics .npz (ADM format: mu, sigma)")
    ref.add_argument("--ref-data", help="an MDS dataset (folder or s3://) to compute reference statistics from")
    ref.add_argument("--ref-images", help="an image folder to compute reference statistics from")
    p.add_argument("--ref-num", type=int, help="use at most this many reference images")
    p.add_argument("--save-ref", help="write the computed reference statistics to this .npz")
    p.add_argument("--num", type=int, default=50000, help="generated samples (50000 for reporting)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--extra", action="store_true",
                   help="also Inception Score, and precision/recall when the reference is data or images")
    p.add_argument("--out", help="write the results as JSON here")
    _add_guidance_args(p)


def _run_fid(args: argparse.Namespace) -> int:
    from tread_scale.parallel.process_group import launched_process_group

    with launched_process_group():
        return _fid(args)


def _fid(args: argparse.Namespace) -> int:
    import json

    from tread_scale.diffusion.edm import EDM
    from tread_scale.evaluation.fid import dataset_images, features_of, folder_images, scores
    from tread_scale.evaluation.generate import generate, rank_indices, world
    from tread_scale.evaluation.inception import load_inception
    from tread_scale.evaluation.metrics import ReferenceStats
    from tread_scale.sample_cli import load_net, make_decoder, resolve_device

    dev = resolve_device(args.device)
    inception = load_inception(args.inception, dev)
    net, meta = load_net(args.weights, dev)
    decode = make_decoder(args.vae, meta, dev)
    real = None
    if args.ref:
        ref = ReferenceStats.load(args.ref)
    else:
        if args.ref_data:
            batches = dataset_images(args.ref_data, None, decode, dev, args.batch_size, args.ref_num)
        else:
            batches = folder_images(args.ref_images, net.input_size[0] * (8 if decode else 1), args.batch_size,
                                    args.ref_num)
        real = features_of(batches, inception, dev, keep=args.extra)
        ref = real.reference()
        if args.save_ref and world()[0] == 0:
            ref.save(args.save_ref)
    objective = meta["objective"]["kind"]
    rank, world_size = world()
    batches = (images for _, _, images, _ in generate(
        net, objective, rank_indices(args.num, rank, world_size), seed=args.seed,
        num_classes=int(meta["data"]["num_classes"]), steps=args.steps or (40 if objective == "edm" else 50),
        guidance=_guidance(args), edm=EDM(sigma_data=float(meta["objective"].get("sigma_data", 0.5))), device=dev,
        batch_size=args.batch_size, decode=decode))
    fake = features_of(batches, inception, dev, keep=args.extra)
    result = scores(fake, ref, real)
    if rank == 0:
        text = json.dumps(result, indent=2)
        sys.stdout.write(text + "\n")
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0


def _add_dry_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dry-run", help="validate a config and sharding plan; parameters, FLOPs, memory per GPU")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value")
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


def _run_dry_run(args: argparse.Namespace) -> int:
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


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="exported EMA weights -> diffusers DiTTransformer2DModel folder")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("import-dit", help="a facebookresearch/DiT checkpoint -> our safetensors (for model.init_from)")
    p.add_argument("checkpoint", help="DiT .pt (state dict, or training checkpoint with 'ema')")
    p.add_argument("--model", required=True, help="registry name, e.g. DiT-XL/2")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=4)
    p = sub.add_parser("plot", help="loss and FID curves of runs against steps and wall-clock time (PNG)")
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    p.add_argument("--out", required=True, help="output .png")


def _run_export(args: argparse.Namespace) -> int:
    from tread_scale.export import export_diffusers
    from tread_scale.sample_cli import resolve_weights

    log.info("wrote %s", export_diffusers(resolve_weights(args.weights), args.out))
    return 0


def _run_import_dit(args: argparse.Namespace) -> int:
    from tread_scale.export import import_facebook_dit

    out = import_facebook_dit(args.checkpoint, args.out, args.model, args.num_classes, args.input_size,
                              args.in_channels)
    log.info("wrote %s (use it with model.init_from=%s)", out, out)
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from tread_scale.plot import plot_runs

    log.info("wrote %s", plot_runs(args.runs, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tread-scale", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_dry_run(sub)
    _add_fid(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tread-scale``; returns the exit code (2 for a clear user error)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    runners = {"convert": _run_convert, "train": _run_train, "sample": _run_sample, "dry-run": _run_dry_run,
               "fid": _run_fid, "export": _run_export, "import-dit": _run_import_dit, "plot": _run_plot}
    try:
        return runners[args.command](args)
    except TreadScaleError as e:
        log.error("%s", e)
        print(f"tread-scale {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
