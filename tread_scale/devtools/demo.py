"""``make demo``: the whole pipeline on embedded data, on a CPU, in a few minutes.

1. start an S3-compatible server (moto) on 127.0.0.1;
2. ``tread-scale convert demo`` → MDS shards at ``s3://tread-demo/shapes``;
3. stream them into TREAD training of a tiny DiT (``yamls/demo.yaml``), with checkpoints, EMA weights and
   sample grids under ``runs/demo/``;
4. sample a final grid from the exported EMA weights;
5. print where every output is, and stop the server.

``--demo text`` (``make demo DEMO=text``) runs the same pipeline for text-to-image: the captioned shapes
(captions name each shape's colour, kind and quadrant) embedded by a tiny local T5 that the demo builds in
``.cache/demo-text-encoder/``, written to ``s3://tread-demo/shapes-captions``; TREAD training of a tiny MMDiT
(``yamls/mmdit_demo.yaml``) under ``runs/mmdit-demo/``; and a final grid of :data:`DEMO_PROMPTS`, a row per
prompt with the prompt beside it.

The demo starts over each time (its run folder is replaced). Extra ``key=value`` arguments override the yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from tread_scale.log_setup import setup_logging

# Torch's CPU threads sleep between parallel regions instead of spinning (read when torch loads, so set before it
# is imported). On a 2-core CPU shared with other work, spinning threads made a demo step up to 6x slower
# (measured 2026-11-30: a B=64 DiT step 6.5 s spinning vs 1.0 s passive; 1.29 vs 0.62 s at load 3).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("tread_scale.demo")
REPO = Path(__file__).resolve().parents[2]
BUCKET = "tread-demo"
DATA = f"s3://{BUCKET}/shapes"
TEXT_DATA = f"s3://{BUCKET}/shapes-captions"
#: Where the text demo builds its tiny T5 (deterministic: a rebuilt one has the same hashes).
TEXT_ENCODERS = REPO / ".cache" / "demo-text-encoder"
#: Prompt FID and CLIP score at the end of the text demo: images generated (one per caption of the data's first
#: samples) and real images of the dataset in the reference.
DEMO_EVAL_NUM = 64
DEMO_EVAL_REF = 256
#: Where the evaluation models are looked for (real ones) or built (random stand-ins).
EVAL_MODELS = REPO / ".cache"
#: Prompts of the text demo's final grid: one and two shapes, every colour and shape word, every quadrant.
DEMO_PROMPTS = [
    "a red circle at top left",
    "a blue square at bottom right",
    "a yellow triangle at top right",
    "a green cross at bottom left",
    "a magenta ring at top left and a cyan diamond at bottom right",
    "a green square at top right and a red triangle at bottom left",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tread_scale.devtools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--demo", choices=("class", "text"), default="class",
                        help="class: a class-conditional DiT (default); text: a text-to-image MMDiT")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo's yaml")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging("INFO")
    lines = _text_demo(args.overrides) if args.demo == "text" else _class_demo(args.overrides)
    sys.stdout.write("\n".join(["", *lines, ""]) + "\n")
    return 0


def _fresh(cfg) -> None:
    if cfg.run_dir.exists():
        log.info("removing the previous demo run at %s", cfg.run_dir)
        shutil.rmtree(cfg.run_dir)


@contextlib.contextmanager
def _demo_bucket(cfg):
    """A fresh run folder and the embedded S3 server (moto) with the demo bucket, its endpoint in the environment."""
    from tread_scale.devtools import local_s3

    _fresh(cfg)
    with local_s3.start("moto", log_dir=REPO / ".cache") as server:
        os.environ.update(server.client_env())
        server.create_bucket(BUCKET)
        log.info("S3 server (moto) at %s, bucket %s", server.endpoint, BUCKET)
        yield server


def _class_demo(overrides: list[str]) -> list[str]:
    from tread_scale.config import load_config
    from tread_scale.data.conversion.writer import ConvertOptions, convert
    from tread_scale.devtools.demo_shapes import DEMO_NUM_SAMPLES
    from tread_scale.devtools.demo_data import DemoSource
    from tread_scale.diffusion.guidance import Guidance
    from tread_scale.sampling import sample_to_folder
    from tread_scale.trainer.builder import train

    t0 = time.time()
    cfg = load_config(REPO / "yamls" / "demo.yaml", [f"data.remote={DATA}", *overrides])
    with _demo_bucket(cfg):
        t_data = time.time()
        source = DemoSource(num_samples=DEMO_NUM_SAMPLES, resolution=cfg.model.input_size,
                            num_classes=cfg.model.num_classes)
        meta = convert(source, DATA, ConvertOptions(processes=2, shard_size="1mb", progress=False))
        t_train = time.time()
        result = train(cfg)
        train_seconds = time.time() - t_train
        final = sample_to_folder(str(result.run_dir), str(result.run_dir / "final"), num=4 * meta.num_classes,
                                 steps=cfg.sampling.steps, guidance=Guidance(cfg_scale=2.0), device="cpu")
    ckpt = Path(result.checkpoint_folder) / "latest-rank0.pt"
    return [
        "tread_scale demo finished",
        f"  dataset (MDS in S3)   {DATA}  ({meta.num_samples} samples, {t_train - t_data:.0f} s to convert)",
        f"  training              {result.batches} batches in {train_seconds:.0f} s (TREAD route "
        f"{cfg.routing.routes[0].start}->{cfg.routing.routes[0].end} at rate {cfg.routing.routes[0].rate})",
        f"  checkpoint            {ckpt.resolve() if ckpt.exists() else result.checkpoint_folder}",
        f"  EMA weights           {result.ema_weights}",
        f"  sample grid (train)   {result.sample_grid}",
        f"  sample grid (final)   {final['grid']}  (CFG 2.0; columns are classes)",
        f"  samples (.npz)        {final['npz']}",
        f"  total                 {time.time() - t0:.0f} s",
    ]


def _text_demo(overrides: list[str]) -> list[str]:
    from tread_scale.config import load_config
    from tread_scale.devtools.demo_data import prepare_demo_encoders, write_captioned_demo
    from tread_scale.devtools.demo_shapes import DEMO_NUM_SAMPLES
    from tread_scale.diffusion.guidance import Guidance
    from tread_scale.sampling import sample_to_folder
    from tread_scale.trainer.builder import train

    t0 = time.time()
    encoders = prepare_demo_encoders(str(TEXT_ENCODERS))  # before the config: it checks that text.t5 exists
    cfg = load_config(REPO / "yamls" / "mmdit_demo.yaml",
                      [f"data.remote={TEXT_DATA}", f"text.t5={encoders['t5']}", *overrides])
    with _demo_bucket(cfg):
        t_data = time.time()
        meta = write_captioned_demo(TEXT_DATA, str(TEXT_ENCODERS), num_samples=DEMO_NUM_SAMPLES,
                                    resolution=cfg.model.input_size, processes=2, shard_size="1mb", buckets=True)
        t_train = time.time()
        result = train(cfg)
        train_seconds = time.time() - t_train
        cfg_scale = cfg.sampling.cfg_scale
        final = sample_to_folder(str(result.run_dir), str(result.run_dir / "final"), prompts=DEMO_PROMPTS,
                                 num=4 * len(DEMO_PROMPTS), steps=cfg.sampling.steps,
                                 guidance=Guidance(cfg_scale=cfg_scale), device="cpu")
        wide_size = _landscape(meta)
        wide = sample_to_folder(str(result.run_dir), str(result.run_dir / "final-wide"), prompts=DEMO_PROMPTS,
                                num=len(DEMO_PROMPTS), steps=cfg.sampling.steps,
                                guidance=Guidance(cfg_scale=cfg_scale), device="cpu", size=wide_size)
        t_eval = time.time()
        scores = _text_scores(result.run_dir, cfg.sampling.steps, Guidance(cfg_scale=cfg_scale))
        eval_seconds = time.time() - t_eval
    route = cfg.routing.routes[0]
    models = "real Inception and CLIP" if scores["real_models"] else "random stand-ins for Inception and CLIP: a " \
        "pipeline check, not quality"
    return [
        "tread_scale text-to-image demo finished",
        f"  text encoder          {encoders['t5']}  (tiny T5, built here; its hashes are in the dataset)",
        f"  dataset (MDS in S3)   {TEXT_DATA}  ({meta.num_samples} captioned samples, {t_train - t_data:.0f} s "
        "to convert)",
        "  aspect-ratio buckets  " + ", ".join(f"{b['image_size'][1]}x{b['image_size'][0]}: {b['count']}"
                                              for b in meta.buckets) + "  (every batch holds one bucket)",
        f"  training              {result.batches} batches in {train_seconds:.0f} s (MMDiT; TREAD routes image "
        f"tokens {route.start}->{route.end} at rate {route.rate})",
        f"  EMA weights           {result.ema_weights}",
        f"  sample grid (train)   {result.sample_grid}  (the dataset's first captions)",
        f"  sample grid (final)   {final['grid']}  (CFG {cfg_scale:g}; a row per prompt, prompts in "
        f"{final['captions'].name})",
        f"  samples (.npz)        {final['npz']}",
        f"  sample grid ({wide_size})".ljust(24) + f"{wide['grid']}  (a landscape bucket's size: sample --size "
        f"{wide_size})",
        f"  prompt FID-{scores['num_samples']}          {scores['fid']:.4g}  and CLIP score {scores['clip_score']:.4g} "
        f"(the dataset's first {scores['num_samples']} captions vs {DEMO_EVAL_REF} of its real images; {models}; "
        f"{eval_seconds:.0f} s; {scores['out']})",
        f"  sample again          tread-scale sample {result.run_dir} --out samples/ --prompt "
        f"\"{DEMO_PROMPTS[-1]}\" --cfg-scale {cfg_scale:g}",
        f"  total                 {time.time() - t0:.0f} s",
    ]


def _landscape(meta) -> str:
    """``WxH`` of the demo data's widest bucket."""
    h, w = max((b["image_size"] for b in meta.buckets), key=lambda hw: hw[1] / hw[0])
    return f"{w}x{h}"


def _text_scores(run_dir: Path, steps: int, guidance) -> dict:
    """Prompt FID and CLIP score of the final EMA weights: one image per caption of the demo data's first
    :data:`DEMO_EVAL_NUM` samples against :data:`DEMO_EVAL_REF` of its real images (the shapes themselves),
    written with their protocol to ``<run>/final/scores.json``."""
    import json

    from tread_scale.devtools.demo_shapes import demo_caption
    from tread_scale.devtools.eval_models import demo_eval_models
    from tread_scale.evaluation.fid import fid_of_weights

    words = sorted({w for i in range(64) for w in demo_caption(i).split()} | {w for p in DEMO_PROMPTS
                                                                               for w in p.split()})
    inception, clip, real = demo_eval_models(EVAL_MODELS, words)
    result = fid_of_weights(str(run_dir / "ema" / "latest.safetensors"), inception, ref_data=TEXT_DATA,
                            ref_num=DEMO_EVAL_REF, prompt_data=TEXT_DATA, num=DEMO_EVAL_NUM, clip=clip, steps=steps,
                            guidance=guidance, batch_size=32, device="cpu")
    out = run_dir / "final" / "scores.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "real_models": real, "out": out}


if __name__ == "__main__":
    sys.exit(main())
