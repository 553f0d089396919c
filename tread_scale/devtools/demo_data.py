"""The demo datasets as conversion sources, their tiny text encoders, and the captioned demo's writer.

The drawing itself (pure numpy, no other tread_scale import) is :mod:`tread_scale.devtools.demo_shapes`;
this module plugs it into conversion (:class:`DemoSource`, :class:`CaptionDemoSource`, read by
``tread-scale convert demo``) and builds the tiny random text encoders the demo and the tests use. Library
code under :mod:`tread_scale.data` never imports it: conversion knows nothing of the demo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tread_scale.data.conversion.captions import (_check_dtype, _empty_prompt_of, _encoder_describe,
                                                  cached_text_encoder, encode_captions, encoder_folders, text_plan)
from tread_scale.data.conversion.sources import Plan, Sample, Source, aligned_chunks, bucket_starts
from tread_scale.data.conversion.text_encoder import _CLIP_SPECIALS, _T5_SPECIALS, KINDS, _word_tokenizer
from tread_scale.data.conversion.writer import ConvertOptions, convert
from tread_scale.devtools.demo_shapes import (DEMO_CAPTION_MAX_LENGTH, DEMO_CAPTION_RESOLUTION, DEMO_CAPTION_VOCAB,
                                              DEMO_CLASSES, DEMO_NUM_CLASSES, DEMO_NUM_SAMPLES, DEMO_RESOLUTION,
                                              demo_caption, demo_caption_bucket, demo_caption_image, demo_image)
from tread_scale.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- class-conditional shapes
@dataclass
class DemoSource(Source):
    """The built-in procedural shapes (:mod:`tread_scale.devtools.demo_shapes`), in pixel space.

    The defaults (4096 samples of 3x16x16, 6 classes) fit ``yamls/demo.yaml``'s model.
    """

    num_samples: int = DEMO_NUM_SAMPLES
    resolution: int = DEMO_RESOLUTION
    seed: int = 0
    num_classes: int = DEMO_NUM_CLASSES
    kind = "demo"

    def describe(self) -> dict:
        return {"kind": self.kind, "num_samples": self.num_samples, "resolution": self.resolution,
                "seed": self.seed, "num_classes": self.num_classes}

    def plan(self) -> Plan:
        if self.num_samples < 1:
            raise DatasetError(f"demo: num_samples must be >= 1, got {self.num_samples}")
        names = [n for n, _ in DEMO_CLASSES[: self.num_classes]]
        return Plan(list(range(self.num_samples)), (3, self.resolution, self.resolution), self.num_classes, names)

    def load(self, items: Sequence[tuple[int, int]], plan: Plan) -> Iterator[Sample]:
        for item_id, index in items:
            img, label = demo_image(index, self.resolution, self.seed, self.num_classes)
            yield Sample(item_id, img, label)




# --------------------------------------------------------------------------- captioned shapes
@dataclass
class CaptionDemoSource(Source):
    """The captioned demo shapes (:func:`~tread_scale.devtools.demo_shapes.demo_caption_image`), in pixel space.

    Args:
        num_samples: Samples.
        resolution: Image side.
        seed: Dataset seed.
        t5: Local T5 encoder folder (e.g. from :func:`~tread_scale.devtools.demo_data.build_tiny_text_encoder`).
        clip: Local CLIP text encoder folder.
        clip_l: CLIP-L's folder, for SD3's text layout (with ``clip_g`` and ``t5``; see
            :mod:`tread_scale.data.conversion.text_encoder`).
        clip_g: CLIP-G's folder, for SD3's text layout.
        max_length: Tokens per encoder.
        batch_size: Captions per encoder forward.
        device: Device of the text encoders.
        encoder_dtype: Compute dtype of the text encoders.
        buckets: Draw a quarter of the samples landscape and a quarter portrait
            (:func:`~tread_scale.devtools.demo_shapes.demo_caption_bucket`) and write them as aspect-ratio
            buckets, as ``convert captions --buckets`` does; ``False``: every sample square, as before.
    """

    num_samples: int = DEMO_NUM_SAMPLES
    resolution: int = DEMO_CAPTION_RESOLUTION
    seed: int = 0
    t5: str | None = None
    clip: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    max_length: int = DEMO_CAPTION_MAX_LENGTH
    batch_size: int = 64
    device: str = "cpu"
    encoder_dtype: str = "float32"
    buckets: bool = False
    kind = "captions-demo"

    def describe(self) -> dict:
        _check_dtype(self.encoder_dtype)
        out = {"kind": self.kind, "num_samples": self.num_samples, "resolution": self.resolution, "seed": self.seed,
               "max_length": self.max_length, "batch_size": self.batch_size, "encoder_dtype": self.encoder_dtype,
               "encoders": _encoder_describe(encoder_folders(self))}
        if self.buckets:
            out["buckets"] = True
        return out

    def plan(self) -> Plan:
        if self.num_samples < 1:
            raise DatasetError(f"demo: num_samples must be >= 1, got {self.num_samples}")
        square = (3, self.resolution, self.resolution)
        if not self.buckets:
            captions = [demo_caption(i, self.seed) for i in range(self.num_samples)]
            return Plan(captions, square, 1, text=text_plan(encoder_folders(self), self.max_length, captions, 1024))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in range(self.num_samples):
            by_size.setdefault(demo_caption_bucket(i, self.resolution), []).append(i)
        items, buckets = [], []
        for hw in sorted(by_size):  # by (height, width), as convert --buckets orders them
            buckets.append({"latent_shape": [3, *hw], "image_size": list(hw), "start": len(items),
                            "count": len(by_size[hw])})
            items += [(demo_caption(i, self.seed), i) for i in by_size[hw]]
        text = text_plan(encoder_folders(self), self.max_length, [c for c, _ in items], 1024)
        spec = ",".join(f"{w}x{h}" for h, w in sorted(by_size))
        return Plan(items, square, 1, text=text, buckets=buckets, bucket_spec=f"captioned demo: {spec}")

    def load(self, items: Sequence[tuple[int, Any]], plan: Plan) -> Iterator[Sample]:
        text = cached_text_encoder(encoder_folders(self), self.max_length, self.device, self.encoder_dtype)
        owned = dict(items)
        for chunk in aligned_chunks(list(owned), len(plan.items), self.batch_size, starts=bucket_starts(plan)):
            captions = [plan.items[i][0] if plan.buckets else plan.items[i] for i in chunk]
            rows = encode_captions(text, captions, [f"demo sample {i}" for i in chunk])
            for i, row in zip(chunk, rows):
                if i not in owned:
                    continue
                if not plan.buckets:
                    yield Sample(i, demo_caption_image(i, self.resolution, self.seed)[0], 0, text=row)
                    continue
                index = plan.items[i][1]
                hw = demo_caption_bucket(index, self.resolution)
                image, _ = demo_caption_image(index, self.resolution, self.seed, size=hw)
                yield Sample(i, image, 0, text=row, orig_size=hw, crop_box=(0, 0, *hw))

    def empty_prompt(self, plan: Plan) -> dict[str, np.ndarray]:
        return _empty_prompt_of(cached_text_encoder(encoder_folders(self), self.max_length, self.device,
                                                    self.encoder_dtype))




# --------------------------------------------------------------------------- tiny text encoders for tests and the demo
def build_tiny_text_encoder(folder: str | os.PathLike, kind: str = "t5", seed: int = 0,
                            vocab: Sequence[str] | None = None, width: int = 32, layers: int = 2,
                            projection: bool = True) -> str:
    """Write a tiny random text encoder and its tokenizer to ``folder`` (``save_pretrained`` layout).

    Nothing is downloaded: the tokenizer is a whole-word vocabulary (``vocab``, by default the captioned
    demo's words) built in process. Deterministic: the same arguments write the same bytes.

    Args:
        folder: Output folder (created).
        kind: ``t5`` (a ``T5EncoderModel``) or a CLIP kind (``clip``, ``clip_l``, ``clip_g``: a
            ``CLIPTextModelWithProjection`` when ``projection``, else a ``CLIPTextModel``).
        seed: Seed of the random weights.
        vocab: Words it knows; others become ``<unk>``.
        width: Hidden width.
        layers: Transformer layers.
        projection: For CLIP, add a text projection (pooled width ``width // 2``).

    Returns:
        The folder.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if kind not in KINDS:
        raise ConfigError(f"text encoder kind {kind!r} is not one of {KINDS}")
    if vocab is None:
        vocab = DEMO_CAPTION_VOCAB
    words = list(vocab) + [",", "."]
    if kind == "t5":
        tok, ids = _word_tokenizer(words, _T5_SPECIALS, "$A </s>", 512, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
        config = T5Config(vocab_size=len(ids), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=layers,
                          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                          dropout_rate=0.0, pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"],
                          decoder_start_token_id=ids["<pad>"])
        make = T5EncoderModel
    else:
        tok, ids = _word_tokenizer(words, _CLIP_SPECIALS, "<|startoftext|> $A <|endoftext|>", 77,
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
        config = CLIPTextConfig(vocab_size=len(ids), hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                                projection_dim=max(width // 2, 1), bos_token_id=ids["<|startoftext|>"],
                                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
        make = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make(config).eval()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)




# --------------------------------------------------------------------------- writing the captioned demo
def prepare_demo_encoders(encoder_dir: str, encoders: Sequence[str] = ("t5",), seed: int = 0) -> dict[str, str]:
    """The captioned demo's tiny text encoders in ``encoder_dir/<kind>``, built when missing.

    They are deterministic in ``seed``: a rebuilt encoder has the same content hashes, so it matches
    datasets written with an earlier build.

    Returns:
        ``{kind: folder}``, for :class:`~tread_scale.data.conversion.text_encoder.TextEncoder` and the converters.

    Raises:
        ConfigError: For an unknown kind.
    """
    if not encoders or any(k not in KINDS for k in encoders):
        raise ConfigError(f"captioned demo encoders {list(encoders)}: choose from {list(KINDS)}")
    folders = {}
    for kind in encoders:
        folder = Path(encoder_dir, kind)
        if not all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
            log.info("building the tiny %s text encoder of the captioned demo at %s", kind, folder)
            build_tiny_text_encoder(folder, kind, seed=seed)
        folders[kind] = str(folder)
    return folders


def write_captioned_demo(out: str, encoder_dir: str, *, encoders: Sequence[str] = ("t5",),
                         num_samples: int = DEMO_NUM_SAMPLES, resolution: int = DEMO_CAPTION_RESOLUTION, seed: int = 0,
                         max_length: int = DEMO_CAPTION_MAX_LENGTH, encoder_seed: int = 0, processes: int = 1,
                         shard_size: str = "64mb", work_dir: str | None = None, overwrite: bool = False,
                         progress: bool = False, buckets: bool = False):
    """Write the captioned demo as MDS shards with text embeddings, at ``out`` (local folder or ``s3://``).

    The tiny text encoders are built into ``encoder_dir/<kind>`` (kept when already there; they are
    deterministic in ``encoder_seed``, so a rebuilt one has the same hashes) and recorded in the metadata:
    give the same folders to sampling to encode prompts.

    Args:
        out: Destination.
        encoder_dir: Local folder for the tiny encoders (``t5/`` and/or ``clip/`` inside).
        encoders: Which to build and use: ``("t5",)``, ``("clip",)`` or both.
        num_samples: Samples.
        resolution: Image side.
        seed: Dataset seed.
        max_length: Tokens per encoder.
        encoder_seed: Seed of the encoders' random weights.
        processes: Worker processes.
        shard_size: MDS shard size limit.
        work_dir: Staging folder for ``s3://`` outputs.
        overwrite: Replace an output holding another conversion.
        progress: Show a progress bar.
        buckets: Also draw landscape and portrait samples, written as aspect-ratio buckets
            (:class:`CaptionDemoSource`).

    Returns:
        The dataset's :class:`~tread_scale.data.metadata.LatentMetadata` (with its ``text`` section).
    """
    folders = prepare_demo_encoders(encoder_dir, encoders, encoder_seed)
    source = CaptionDemoSource(num_samples=num_samples, resolution=resolution, seed=seed, t5=folders.get("t5"),
                               clip=folders.get("clip"), max_length=max_length, buckets=buckets)
    return convert(source, out, ConvertOptions(processes=processes, shard_size=shard_size, work_dir=work_dir,
                                               overwrite=overwrite, progress=progress))
