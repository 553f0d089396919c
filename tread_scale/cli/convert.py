"""``tread-scale convert {demo,npy,images,captions}``: write MDS shards of latents (local folder or ``s3://``)."""

from __future__ import annotations

import argparse
import logging

from tread_scale.devtools.demo_shapes import (DEMO_CAPTION_MAX_LENGTH, DEMO_CAPTION_RESOLUTION, DEMO_NUM_CLASSES,
                                              DEMO_NUM_SAMPLES, DEMO_RESOLUTION)

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


def _buckets(q: argparse.ArgumentParser) -> None:
    q.add_argument("--buckets", metavar="SPEC",
                   help="aspect-ratio buckets instead of square crops: AREApx:MULT (e.g. 1024px:64: about 1024² "
                        "pixels, sides multiples of 64, aspect ratios within 1:4..4:1) or WxH,WxH,... (e.g. "
                        "256x256,384x192,192x384); each image is resized to cover its nearest-aspect bucket and "
                        "centre-cropped; --resolution is then unused")


def _text_encoders(q: argparse.ArgumentParser, max_length: int | None) -> None:
    q.add_argument("--t5", help="local T5 encoder folder (T5EncoderModel + tokenizer, save_pretrained layout)")
    q.add_argument("--clip", help="local CLIP text encoder folder (CLIPTextModel[WithProjection] + tokenizer)")
    q.add_argument("--clip-l", help="SD3's layout, with --clip-g and --t5: local CLIP-L folder (penultimate tokens "
                                    "of CLIP-L and CLIP-G side by side, then T5's; pooled CLIP-L + CLIP-G)")
    q.add_argument("--clip-g", help="SD3's layout: local CLIP-G folder (CLIPTextModelWithProjection + tokenizer)")
    q.add_argument("--max-length", type=int, default=max_length,
                   help="tokens per encoder (default 77; CLIP takes at most its positions; in SD3's layout the T5 "
                        "tokens, 256 in SD3); longer captions are truncated and counted. For .npz with encoders: "
                        "the limit they were made with")
    q.add_argument("--encoder-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the text encoders (default float32; embeddings are stored float16)")
    q.add_argument("--max-caption-bytes", type=int, default=1024,
                   help="longest caption string stored, in UTF-8 bytes (default 1024; longer ones are cut)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``convert`` and its four sources."""
    p = sub.add_parser(NAME, help="write MDS shards of latents (local folder or s3://bucket/prefix)")
    srcs = p.add_subparsers(dest="source", required=True)

    demo = srcs.add_parser("demo", help="the built-in procedural shapes dataset (pixel space; fits yamls/demo.yaml)")
    demo.add_argument("--num-samples", type=int, default=DEMO_NUM_SAMPLES)
    demo.add_argument("--resolution", type=int, default=None,
                      help=f"image side (default {DEMO_RESOLUTION}: yamls/demo.yaml's model.input_size; "
                           f"{DEMO_CAPTION_RESOLUTION} with --captions)")
    demo.add_argument("--num-classes", type=int, default=DEMO_NUM_CLASSES)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--captions", action="store_true",
                      help="the captioned demo: colour, shape and position named by each caption, with text "
                           "embeddings from tiny local encoders (built into --encoder-dir)")
    demo.add_argument("--encoder-dir", default="data/demo-text-encoders",
                      help="with --captions: folder of the tiny text encoders (built when missing; default "
                           "data/demo-text-encoders)")
    demo.add_argument("--encoders", default="t5", help="with --captions: t5, clip or t5,clip (default t5)")
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
    _buckets(img)
    _common(img)

    cap = srcs.add_parser(
        "captions", help="images with captions (sidecar .txt or a .jsonl/.csv manifest) or precomputed .npz, "
                         "with text embeddings")
    cap.add_argument("input", help="image folder (a <stem>.txt caption beside each image), a .jsonl/.csv manifest "
                                   "(path, caption), or a folder of .npz files (latent, text_emb, text_mask[, "
                                   "text_pooled, caption])")
    cap.add_argument("--format", default="auto", choices=["auto", "images", "npz"],
                     help="what input holds (default auto: a file is a manifest, a folder of images is sidecar, "
                          "a folder of .npz files is precomputed)")
    cap.add_argument("--vae", help="images: local AutoencoderKL folder (save_pretrained), or 'none' for pixels")
    cap.add_argument("--resolution", type=int, default=256)
    cap.add_argument("--batch-size", type=int, default=32, help="images and captions per forward (default 32)")
    cap.add_argument("--seed", type=int, default=0)
    cap.add_argument("--device", default="cpu")
    _buckets(cap)
    _text_encoders(cap, None)
    _common(cap)
    return p


def _captions_source(args: argparse.Namespace):
    """The captioned source ``args`` describe (raising :class:`ConfigError` for a wrong combination)."""
    from pathlib import Path

    from tread_scale.data.conversion.captions import CaptionFolderSource, CaptionNpzSource
    from tread_scale.data.conversion.sources import IMAGE_SUFFIXES
    from tread_scale.errors import ConfigError

    fmt = args.format
    path = Path(args.input)
    if fmt == "auto":
        if path.is_dir() and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")) \
                and any(path.rglob("*.npz")):
            fmt = "npz"
        else:
            fmt = "images"
    if fmt == "npz":
        if args.vae:
            raise ConfigError(f"--vae is for images; {args.input} holds precomputed latents (.npz)")
        if args.buckets:
            raise ConfigError(f"--buckets is for images; {args.input} holds precomputed latents (.npz)")
        return CaptionNpzSource(folder=args.input, t5=args.t5, clip=args.clip, clip_l=args.clip_l, clip_g=args.clip_g,
                                max_length=args.max_length,
                                device=args.device, encoder_dtype=args.encoder_dtype,
                                max_caption_bytes=args.max_caption_bytes)
    if not args.vae:
        raise ConfigError("--vae is required for images (a local AutoencoderKL folder, or 'none' for pixels)")
    if not (args.t5 or args.clip or args.clip_l or args.clip_g):
        raise ConfigError("give a text encoder: --t5 FOLDER and/or --clip FOLDER, or SD3's --clip-l, --clip-g and --t5 "
                          "(local save_pretrained folders)")
    return CaptionFolderSource(input=args.input, resolution=args.resolution, vae=args.vae, t5=args.t5, clip=args.clip,
                               clip_l=args.clip_l, clip_g=args.clip_g,
                               max_length=args.max_length or 77, batch_size=args.batch_size, seed=args.seed,
                               device=args.device, encoder_dtype=args.encoder_dtype,
                               max_caption_bytes=args.max_caption_bytes, buckets=args.buckets)


def _log_buckets(meta) -> None:
    """Log a bucketed dataset's buckets: pixel size, latent shape, samples."""
    log.info("%d aspect-ratio bucket(s) from --buckets %s (%s):", len(meta.buckets), meta.bucket_spec, meta.crop_rule)
    for b in meta.buckets:
        h, w = b["image_size"]
        log.info("  %dx%d px (WxH), latent %s: %d sample(s), ids [%d, %d)", w, h, tuple(b["latent_shape"]),
                 b["count"], b["start"], b["start"] + b["count"])


def run(args: argparse.Namespace) -> int:
    """Convert the chosen source; logs what the dataset holds."""
    from tread_scale.data.conversion.writer import ConvertOptions, convert
    from tread_scale.data.conversion.sources import ImageFolderSource, NpyFolderSource
    from tread_scale.devtools.demo_data import DemoSource

    opts = ConvertOptions(processes=args.processes, group_size=args.group_size, shard_size=args.shard_size,
                          compression=args.compression, work_dir=args.work_dir, overwrite=args.overwrite,
                          progress=not args.no_progress)
    if args.source == "demo" and args.captions:
        from tread_scale.devtools.demo_data import CaptionDemoSource, prepare_demo_encoders

        folders = prepare_demo_encoders(args.encoder_dir, [k.strip() for k in args.encoders.split(",") if k.strip()])
        source = CaptionDemoSource(num_samples=args.num_samples, resolution=args.resolution or DEMO_CAPTION_RESOLUTION,
                                   seed=args.seed, t5=folders.get("t5"), clip=folders.get("clip"),
                                   max_length=DEMO_CAPTION_MAX_LENGTH)
    elif args.source == "demo":
        source = DemoSource(num_samples=args.num_samples, resolution=args.resolution or DEMO_RESOLUTION,
                            seed=args.seed, num_classes=args.num_classes)
    elif args.source == "captions":
        source = _captions_source(args)
    elif args.source == "npy":
        source = NpyFolderSource(folder=args.folder, num_classes=args.num_classes)
    else:
        source = ImageFolderSource(folder=args.folder, resolution=args.resolution, vae=args.vae,
                                   batch_size=args.batch_size, seed=args.seed, device=args.device,
                                   buckets=args.buckets)
    meta = convert(source, args.out, opts)
    shape = "reference shape" if meta.buckets is not None else "shape"
    log.info("dataset at %s: %d samples of %s %s, %d classes", args.out, meta.num_samples, shape,
             tuple(meta.latent_shape), meta.num_classes)
    if meta.buckets is not None:
        _log_buckets(meta)
    if meta.text is not None:
        t = meta.text
        log.info("text: %d tokens of width %d, pooled width %d, encoders %s; %d caption(s) truncated to %d tokens, "
                 "%d caption string(s) cut to %d bytes", t.seq_len, t.emb_dim, t.pooled_dim,
                 ", ".join(f"{e['kind']}={e['name']}" for e in t.encoders) or "none recorded", t.truncated,
                 t.max_length, t.clipped, t.caption_bytes)
        if t.longest_tokens:
            log.info("longest caption: %s (--max-length %d)", ", ".join(
                f"{n} tokens ({kind})" for kind, n in sorted(t.longest_tokens.items())), t.max_length)
    return 0
