"""Captioned sources for ``tread-scale convert captions``: latents plus text embeddings per sample.

Two sources, each a :class:`~tread_scale.data.conversion.sources.Source` that :func:`~tread_scale.data.conversion.writer.convert`
writes like any other (the captioned demo's source,
:class:`~tread_scale.devtools.demo_data.CaptionDemoSource`, is built on the same helpers) (groups, ``--processes``, done-files, S3):

* :class:`CaptionFolderSource`: images with one caption each, from a sidecar ``<image stem>.txt`` beside
  every image, or from a ``.jsonl``/``.csv`` manifest of path + caption. Images go through the same code as
  ``convert images`` (crop, resize, VAE); captions through a :class:`~tread_scale.data.conversion.text_encoder.TextEncoder`.
* :class:`CaptionNpzSource`: precomputed ``.npz`` files of latents, text embeddings and masks.

Stored columns besides ``latent``/``label``/``id`` (all fixed-size, so the training reader's memory-mapped
fast path reads them): ``text_emb`` ``ndarray:float16:L,D``, ``text_mask`` ``ndarray:uint8:L``,
``text_pooled`` ``ndarray:float16:P`` and ``caption`` ``ndarray:uint8:N`` (UTF-8, zero-padded to the
dataset's ``caption_bytes``). Captioned datasets have one class: every label is 0.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tread_scale.data.metadata import TextMetadata, encode_caption
from tread_scale.data.conversion.sources import (IMAGE_SUFFIXES, ImageEncoder, Plan, Sample, Source, _npz_keys,
                                                 bucket_starts, bucketed_item_loader, check_sample,
                                                 encode_image_chunks, files_stamp, plan_buckets, vae_plan)
from tread_scale.errors import ConfigError, DatasetError
from tread_scale.jsonl import json_objects

log = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
MANIFEST_PATH_KEYS = ("path", "image", "file", "file_name")
MANIFEST_CAPTION_KEYS = ("caption", "text", "prompt")
#: In a folder of precomputed ``.npz`` files: the empty prompt's embedding, when no encoder is given.
NPZ_EMPTY_PROMPT = "empty_prompt.npz"
_NPZ_TEXT_KEYS = {"text_emb": ("text_emb", "text_embeds", "prompt_embeds"),
                  "text_mask": ("text_mask", "attention_mask", "prompt_mask"),
                  "text_pooled": ("text_pooled", "pooled_prompt_embeds", "pooled"),
                  "caption": ("caption", "captions", "text", "prompt")}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


# --------------------------------------------------------------------------- stored columns
def caption_width(captions: Sequence[str], max_bytes: int) -> int:
    """Bytes of the ``caption`` column: the longest UTF-8 caption rounded up to 16, at most ``max_bytes``."""
    longest = max((len(c.encode("utf-8")) for c in captions), default=0)
    return max(16, min(int(max_bytes), -(-longest // 16) * 16))


def text_row(sample: Sample, text: TextMetadata) -> tuple[dict[str, np.ndarray], bool]:
    """The text columns of one sample as written, and whether its caption string was clipped.

    Raises:
        DatasetError: Naming the input, for a wrong shape or non-finite values.
    """
    t = sample.text
    where = t.get("where", f"sample {sample.id}")
    emb = np.asarray(t["text_emb"]).astype(np.float16)
    mask = np.asarray(t["text_mask"]).astype(bool)
    pooled = np.asarray(t["text_pooled"]).astype(np.float16)
    for name, arr, shape in (("text_emb", emb, (text.seq_len, text.emb_dim)), ("text_mask", mask, (text.seq_len,)),
                             ("text_pooled", pooled, (text.pooled_dim,))):
        if arr.shape != shape:
            raise DatasetError(f"{where}: {name} has shape {arr.shape}, the dataset's is {shape} (set by the first "
                               "file or the encoders)")
    if not (np.isfinite(emb).all() and np.isfinite(pooled).all()):
        raise DatasetError(f"{where}: text embedding has NaN or Inf values (in float16: values beyond ±65504 "
                           "overflow; encode T5 in float32 or bfloat16)")
    caption, clipped = encode_caption(t.get("caption", ""), text.caption_bytes)
    return {"text_emb": np.ascontiguousarray(emb), "text_mask": mask.astype(np.uint8),
            "text_pooled": np.ascontiguousarray(pooled), "caption": caption}, clipped


# --------------------------------------------------------------------------- encoders
_ENCODERS: dict[tuple, Any] = {}


def encoder_folders(source) -> dict[str, str | None]:
    """A caption source's encoder folders by kind (``t5``, ``clip``, ``clip_l``, ``clip_g``; unset ones None)."""
    from tread_scale.data.conversion.text_encoder import KINDS

    return {k: getattr(source, k, None) for k in KINDS}


def cached_text_encoder(folders: dict[str, str | None], max_length: int, device: str, dtype: str):
    """A :class:`~tread_scale.data.conversion.text_encoder.TextEncoder`, loaded once per process and arguments."""
    import torch

    from tread_scale.data.conversion.text_encoder import TextEncoder, folder_hashes

    given = {k: f for k, f in folders.items() if f}
    key = (tuple(sorted(given.items())), max_length, device, dtype, *(folder_hashes(f) for f in given.values()))
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one set of encoders at a time (they can be large)
        _ENCODERS[key] = TextEncoder.from_folders(**given, max_length=max_length, device=device,
                                                  dtype=getattr(torch, _DTYPES[dtype]))
    return _ENCODERS[key]


def _encoder_describe(folders: dict[str, str | None]) -> dict:
    from tread_scale.data.conversion.text_encoder import encoder_flag, folder_hashes

    out = {}
    for kind, folder in folders.items():
        if folder is not None:
            if not Path(folder).is_dir():
                raise ConfigError(f"{encoder_flag(kind)} {folder!r}: no such folder (a local save_pretrained folder of "
                                  "the encoder and its tokenizer; nothing is downloaded)")
            out[kind] = {"folder": str(Path(folder).resolve()), "sha256": folder_hashes(folder)}
    return out


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ConfigError(f"--encoder-dtype {dtype!r} is not one of {sorted(_DTYPES)}")


def text_plan(folders: dict[str, str | None], max_length: int, captions: Sequence[str],
              max_caption_bytes: int) -> TextMetadata:
    """The ``text`` facts of a conversion through encoder folders (read from their configs; nothing loaded)."""
    from tread_scale.data.conversion.text_encoder import inspect_encoder, text_layout

    infos = {k: inspect_encoder(f, k) for k, f in folders.items() if f}
    lay = text_layout(infos.get("t5"), infos.get("clip"), max_length, clip_l=infos.get("clip_l"),
                      clip_g=infos.get("clip_g"))
    return TextMetadata(encoders=lay.records(), max_length=max_length, seq_len=lay.seq_len, emb_dim=lay.emb_dim,
                        pooled_dim=lay.pooled_dim, pooled=lay.pooled,
                        caption_bytes=caption_width(captions, max_caption_bytes), layout=lay.style)


def encode_captions(encoder, captions: Sequence[str], wheres: Sequence[str]) -> list[dict]:
    """The text of each caption as a sample's ``text``: its arrays, and what the conversion's summary counts.

    Besides the arrays and ``caption``: ``truncated``, ``tokens`` (encoder kind → token count before
    truncation) and ``unknown`` (encoder kind → a record of :func:`~tread_scale.data.conversion.text_encoder.
    merge_unknown_words`; reported once for the whole conversion, not per batch).
    """
    from tread_scale.data.conversion.text_encoder import merge_unknown_words

    encoded = encoder.encode(captions, warn_unknown=None)
    emb, mask, pooled = (encoded[k].numpy() for k in ("text_emb", "text_mask", "text_pooled"))
    unk = encoder.unk_tokens
    return [{"text_emb": emb[j], "text_mask": mask[j], "text_pooled": pooled[j], "caption": captions[j],
             "truncated": bool(encoded["truncated"][j]), "tokens": encoded["tokens"][j],
             "unknown": merge_unknown_words({}, encoded["unknown"][j], unk), "where": wheres[j]}
            for j in range(len(captions))]


def _empty_prompt_of(encoder) -> dict[str, np.ndarray]:
    from tread_scale.data.conversion.text_encoder import empty_prompt_arrays

    return empty_prompt_arrays(encoder.encode([""], warn_unknown=None))


# --------------------------------------------------------------------------- images + captions
def _read_manifest(path: Path) -> list[tuple[str, str | None, str]]:
    """``(image path as written, caption or None, where)`` per manifest row (``.jsonl`` or ``.csv``)."""
    rows: list[tuple[str, str | None, str]] = []

    def pick(d: dict, keys: tuple[str, ...], where: str, what: str, required: bool) -> str | None:
        key = next((k for k in keys if k in d), None)
        if key is None and required:
            raise DatasetError(f"{where}: no {what} field (one of {list(keys)}) in {sorted(d)}")
        value = d.get(key) if key else None
        return None if value is None else str(value)

    if path.suffix.lower() == ".jsonl":
        for where, d in json_objects(path, DatasetError, "a JSON object with path and caption"):
            rows.append((pick(d, MANIFEST_PATH_KEYS, where, "image path", True),
                         pick(d, MANIFEST_CAPTION_KEYS, where, "caption", False), where))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if not any(k in fields for k in MANIFEST_PATH_KEYS):
                raise DatasetError(f"{path}: the header {fields} names no image path column (one of "
                                   f"{list(MANIFEST_PATH_KEYS)})")
            for lineno, d in enumerate(reader, 2):
                where = f"{path}:{lineno}"
                rows.append((pick(d, MANIFEST_PATH_KEYS, where, "image path", True),
                             pick(d, MANIFEST_CAPTION_KEYS, where, "caption", False), where))
    else:
        raise DatasetError(f"manifest {path}: expected a .jsonl or .csv file")
    return rows


@dataclass
class CaptionFolderSource(Source):
    """Images with one caption each, encoded by a VAE and text encoders.

    Captions come from a sidecar text file beside each image (``cat.png`` → ``cat.txt``, searched
    recursively) or from a manifest (``input`` is a ``.jsonl`` file of objects with ``path`` and
    ``caption``, or a ``.csv`` with those columns; paths relative to the manifest's folder). An image without
    a caption, or with an empty one, is an error naming it, before any work. Files that are not images are
    skipped with a warning naming them, as ``convert images`` does.

    Args:
        input: Image folder (sidecar captions) or manifest file.
        resolution: Image side after crop and resize.
        vae: Local VAE folder, or ``none`` for pixels.
        t5: Local T5 encoder folder (model + tokenizer), or ``None``.
        clip: Local CLIP text encoder folder (model + tokenizer), or ``None``.
        clip_l: CLIP-L's folder, for SD3's text layout (with ``clip_g`` and ``t5``; see
            :mod:`tread_scale.data.conversion.text_encoder`).
        clip_g: CLIP-G's folder, for SD3's text layout.
        max_length: Tokens per encoder; longer captions are cut (and counted in the summary).
        batch_size: Images and captions per forward (aligned chunks: the output is independent of ``--processes``).
        seed: Seed of the latent sampling.
        device: Device of the VAE and the text encoders.
        encoder_dtype: Compute dtype of the text encoders: ``float32`` (default), ``bfloat16`` or ``float16``.
        max_caption_bytes: Most bytes of a stored caption string (longer ones are cut and counted).
        buckets: Aspect-ratio buckets (``AREApx:MULT`` or ``WxH,...``), as for
            :class:`~tread_scale.data.conversion.sources.ImageFolderSource`; ``None``: square crops.
    """

    input: str = ""
    resolution: int = 256
    vae: str = "none"
    t5: str | None = None
    clip: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    max_length: int = 77
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    encoder_dtype: str = "float32"
    max_caption_bytes: int = 1024
    buckets: str | None = None
    kind = "captions"

    def _manifest(self) -> Path | None:
        p = Path(self.input)
        if p.is_file():
            return p
        if not p.is_dir():
            raise DatasetError(f"caption input {self.input!r} does not exist (an image folder with .txt captions, or a "
                               ".jsonl/.csv manifest)")
        return None

    def _entries(self, warn: bool = True) -> list[tuple[Path, str | None, str]]:
        """``(image, caption or None, where)`` for every image, in a stable order (warning of non-images)."""
        manifest = self._manifest()
        if manifest is None:
            root = Path(self.input)
            files = sorted(p for p in root.rglob("*") if p.is_file())
            out = []
            for p in files:
                if p.suffix.lower() == CAPTION_SUFFIX:
                    continue
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    if warn:
                        log.warning("skipping %s: not an image file (suffix %r)", p, p.suffix)
                    continue
                side = p.with_suffix(CAPTION_SUFFIX)
                out.append((p, side.read_text(encoding="utf-8") if side.is_file() else None, str(p)))
            return out
        out = []
        for rel, caption, where in _read_manifest(manifest):
            p = Path(rel) if Path(rel).is_absolute() else manifest.parent / rel
            if not p.is_file():
                raise DatasetError(f"{where}: image {p} does not exist")
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                if warn:
                    log.warning("skipping %s (%s): not an image file (suffix %r)", p, where, p.suffix)
                continue
            out.append((p, caption, f"{p} ({where})"))
        return out

    def describe(self) -> dict:
        _check_dtype(self.encoder_dtype)
        manifest = self._manifest()
        entries = self._entries(warn=False)
        stamped = [e[0] for e in entries]
        if manifest is None:
            stamped += [p.with_suffix(CAPTION_SUFFIX) for p in stamped if p.with_suffix(CAPTION_SUFFIX).is_file()]
        else:
            stamped.append(manifest)
        out = {"kind": self.kind, "input": str(Path(self.input).resolve()), "resolution": self.resolution,
               "vae": self.vae if self.vae == "none" else str(Path(self.vae).resolve()), "seed": self.seed,
               "batch_size": self.batch_size, "max_length": self.max_length, "encoder_dtype": self.encoder_dtype,
               "max_caption_bytes": self.max_caption_bytes, "encoders": _encoder_describe(encoder_folders(self)),
               "files": len(entries), "stamp": files_stamp(sorted(stamped))}
        if self.buckets is not None:  # the buckets decide the sizes: resolution is not used
            out["buckets"] = self.buckets
            del out["resolution"]
        return out

    def plan(self) -> Plan:
        _check_dtype(self.encoder_dtype)
        entries = self._entries()
        if not entries:
            raise DatasetError(f"caption input {self.input!r} holds no images")
        missing = [where for _, caption, where in entries if caption is None or not caption.strip()]
        if missing:
            how = ("a caption field in the manifest" if self._manifest() is not None
                   else f"a {CAPTION_SUFFIX} file of the same name beside it")
            raise DatasetError(f"{len(missing)} image(s) have no caption (each needs {how}; empty ones count as "
                               f"missing): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        items = [(str(p), caption.strip()) for p, caption, _ in entries]
        text = text_plan(encoder_folders(self), self.max_length, [c for _, c in items], self.max_caption_bytes)
        if self.buckets is None:
            return Plan(items, num_classes=1, text=text, **vae_plan(self.vae, self.resolution))
        layout = plan_buckets([Path(path) for path, _ in items], self.buckets, self.vae)
        return Plan([(*items[j], b, orig, crop) for j, b, orig, crop in layout.order], num_classes=1, text=text,
                    **layout.plan)

    def load(self, items: Sequence[tuple[int, tuple]], plan: Plan) -> Iterator[Sample]:
        images = ImageEncoder(self.vae, self.device, self.seed)
        text = cached_text_encoder(encoder_folders(self), self.max_length, self.device, self.encoder_dtype)
        owned = dict(items)
        bucketed = plan.buckets is not None

        def path_of(i: int) -> Path:
            return Path(plan.items[i][0])

        for chunk, latents, readable in encode_image_chunks(
                list(owned), len(plan.items), self.batch_size, path_of, self.resolution, images,
                pixels_of=bucketed_item_loader(plan, path_of) if bucketed else None, starts=bucket_starts(plan)):
            captions = [plan.items[i][1] for i in chunk]
            rows = encode_captions(text, captions, [plan.items[i][0] for i in chunk])
            for i, latent, ok, row in zip(chunk, latents, readable, rows):
                if ok and i in owned:
                    if not bucketed:
                        check_sample(latent, 0, plan, row["where"])
                        yield Sample(i, latent, 0, text=row)
                        continue
                    bucket, orig, crop = owned[i][2:]
                    check_sample(latent, 0, plan, row["where"], shape=plan.buckets[bucket]["latent_shape"])
                    yield Sample(i, latent, 0, text=row, orig_size=tuple(orig), crop_box=tuple(crop))

    def empty_prompt(self, plan: Plan) -> dict[str, np.ndarray]:
        return _empty_prompt_of(cached_text_encoder(encoder_folders(self), self.max_length, self.device,
                                                    self.encoder_dtype))


# --------------------------------------------------------------------------- precomputed .npz
def _npz_headers(z: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of an open ``.npz`` without reading the arrays."""
    out = {}
    for name in z.files:
        with z.zip.open(name + ".npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        out[name] = (tuple(shape), dtype)
    return out


def _text_keys(files: Sequence[str], path: Path) -> dict[str, str | None]:
    keys = {k: next((a for a in aliases if a in files), None) for k, aliases in _NPZ_TEXT_KEYS.items()}
    for required in ("text_emb", "text_mask"):
        if keys[required] is None:
            raise DatasetError(f"{path}: .npz holds {sorted(files)}; expected a {required!r} array (or one of "
                               f"{list(_NPZ_TEXT_KEYS[required])})")
    return keys


@dataclass
class CaptionNpzSource(Source):
    """A folder of precomputed ``.npz`` files: latents, text embeddings and masks.

    Each file holds one sample or a batch of ``N``: ``latent`` ``(C, H, W)``/``(N, C, H, W)``, ``text_emb``
    ``(L, D)``/``(N, L, D)``, ``text_mask`` ``(L,)``/``(N, L)`` (bool or 0/1), and optionally ``text_pooled``
    ``(P,)``/``(N, P)`` (else the masked mean of the tokens) and ``caption`` (a string or ``N`` strings).
    The empty prompt's embedding comes from the encoders when ``t5``/``clip`` are given (they are then
    recorded in the metadata, and must produce the files' shapes), else from ``empty_prompt.npz`` in the
    folder (same keys, one sample).

    Args:
        folder: Root folder (searched recursively).
        t5: The T5 folder the embeddings were made with, if known.
        clip: The CLIP folder the embeddings were made with, if known.
        clip_l: CLIP-L's folder, for SD3's text layout (with ``clip_g`` and ``t5``; see
            :mod:`tread_scale.data.conversion.text_encoder`).
        clip_g: CLIP-G's folder, for SD3's text layout.
        max_length: The token limit they were made with (needed with encoders).
        device: Device of the encoders (empty prompt only).
        encoder_dtype: Compute dtype of the encoders.
        max_caption_bytes: Most bytes of a stored caption string.
    """

    folder: str = ""
    t5: str | None = None
    clip: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None
    max_length: int | None = None
    device: str = "cpu"
    encoder_dtype: str = "float32"
    max_caption_bytes: int = 1024
    kind = "captions-npz"

    def _files(self) -> list[Path]:
        root = Path(self.folder)
        if not root.is_dir():
            raise DatasetError(f"input folder {self.folder!r} does not exist")
        return sorted(p for p in root.rglob("*.npz") if p.is_file() and p != root / NPZ_EMPTY_PROMPT)

    def _encoders(self) -> bool:
        return any(encoder_folders(self).values())

    def describe(self) -> dict:
        _check_dtype(self.encoder_dtype)
        files = self._files()
        empty = Path(self.folder) / NPZ_EMPTY_PROMPT
        return {"kind": self.kind, "folder": str(Path(self.folder).resolve()), "max_length": self.max_length,
                "encoder_dtype": self.encoder_dtype, "max_caption_bytes": self.max_caption_bytes,
                "encoders": _encoder_describe(encoder_folders(self)), "files": len(files),
                "stamp": files_stamp(files + ([empty] if empty.is_file() else []))}

    def plan(self) -> Plan:
        files = self._files()
        if not files:
            raise DatasetError(f"input folder {self.folder!r} holds no .npz files")
        root = Path(self.folder)
        items: list[tuple[str, int]] = []
        captions: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        stored_pooled = None
        for p in files:
            with np.load(p) as z:
                latent_key, _ = _npz_keys(z, p)
                keys = _text_keys(z.files, p)
                heads = _npz_headers(z)
                caption = z[keys["caption"]] if keys["caption"] else None
            lat_shape = heads[latent_key][0]
            batched = len(lat_shape) == 4
            n = lat_shape[0] if batched else 1
            got = {"latent": lat_shape[1:] if batched else lat_shape}
            for k in ("text_emb", "text_mask", "text_pooled"):
                if keys[k] is not None:
                    shape = heads[keys[k]][0]
                    if batched and (not shape or shape[0] != n):
                        raise DatasetError(f"{p}: {n} latents but {keys[k]!r} has shape {shape}")
                    got[k] = shape[1:] if batched else shape
            if stored_pooled is None:
                stored_pooled = keys["text_pooled"] is not None
            elif stored_pooled != (keys["text_pooled"] is not None):
                raise DatasetError(f"{p}: {'has' if not stored_pooled else 'lacks'} a text_pooled array, unlike the "
                                   "first file: give it in every file or in none")
            for k, shape in got.items():
                if shapes.setdefault(k, shape) != shape:
                    raise DatasetError(f"{p}: {k} has shape {shape}, the dataset's is {shapes[k]} (set by the first "
                                       "file)")
            if caption is None:
                caption = [""] * n
            caption = [str(c) for c in np.atleast_1d(caption)]
            if len(caption) != n:
                raise DatasetError(f"{p}: {n} latents but {len(caption)} captions")
            rel = p.relative_to(root).as_posix()
            items += [(rel, i if batched else -1) for i in range(n)]
            captions += caption
        if len(shapes["latent"]) != 3:
            raise DatasetError(f"{files[0]}: latents must be (C, H, W) or (N, C, H, W), got shape {shapes['latent']}")
        if len(shapes["text_emb"]) != 2 or shapes["text_mask"] != shapes["text_emb"][:1]:
            raise DatasetError(f"{files[0]}: text_emb must be (L, D) and text_mask (L,) per sample, got "
                               f"{shapes['text_emb']} and {shapes['text_mask']}")
        seq_len, emb_dim = shapes["text_emb"]
        pooled_dim = shapes["text_pooled"][0] if stored_pooled else emb_dim
        text = TextMetadata(encoders=[], max_length=self.max_length or seq_len, seq_len=seq_len, emb_dim=emb_dim,
                            pooled_dim=pooled_dim, pooled="stored" if stored_pooled else "mean",
                            caption_bytes=caption_width(captions, self.max_caption_bytes))
        if self._encoders():
            text = self._check_encoders(text, files[0])
        else:
            self._read_empty_file(text)
        return Plan([(rel, i, c) for (rel, i), c in zip(items, captions)], shapes["latent"], 1, text=text)

    def _check_encoders(self, text: TextMetadata, first: Path) -> TextMetadata:
        if self.max_length is None:
            raise ConfigError("--max-length is needed with text encoders for precomputed embeddings (the token limit "
                              "they were made with)")
        enc = text_plan(encoder_folders(self), self.max_length, [], self.max_caption_bytes)
        for name in ("seq_len", "emb_dim", "pooled_dim"):
            if getattr(enc, name) != getattr(text, name):
                raise DatasetError(f"{first}: text embeddings have {name}={getattr(text, name)} but the given encoders "
                                   f"with --max-length {self.max_length} make {name}={getattr(enc, name)}")
        if text.pooled == "mean" and enc.pooled != "t5_mean":
            raise DatasetError(f"{first}: no text_pooled array, but the encoders pool with {enc.pooled}: store their "
                               "pooled embeddings as text_pooled")
        return replace(text, encoders=enc.encoders, pooled=enc.pooled if text.pooled == "stored" else text.pooled,
                       layout=enc.layout)

    def _read_empty_file(self, text: TextMetadata) -> dict[str, np.ndarray]:
        path = Path(self.folder) / NPZ_EMPTY_PROMPT
        if not path.is_file():
            raise DatasetError(f"{self.folder}: no empty-prompt embedding (needed for classifier-free guidance): put "
                               f"{NPZ_EMPTY_PROMPT} (text_emb, text_mask[, text_pooled] of the prompt \"\") in the "
                               "folder, or give the encoders (--t5/--clip) to compute it")
        with np.load(path) as z:
            keys = _text_keys(z.files, path)
            emb, mask = z[keys["text_emb"]], z[keys["text_mask"]].astype(bool)
            pooled = z[keys["text_pooled"]] if keys["text_pooled"] else _masked_mean(emb, mask)
        want = {"text_emb": (text.seq_len, text.emb_dim), "text_mask": (text.seq_len,),
                "text_pooled": (text.pooled_dim,)}
        arrays = {"text_emb": emb.astype(np.float16), "text_mask": mask, "text_pooled": pooled.astype(np.float16)}
        for k, shape in want.items():
            if arrays[k].shape != shape:
                raise DatasetError(f"{path}: {k} has shape {arrays[k].shape}, the dataset's is {shape}")
        return arrays

    def load(self, items: Sequence[tuple[int, tuple[str, int, str]]], plan: Plan) -> Iterator[Sample]:
        root = Path(self.folder)
        cache: tuple[str, dict] | None = None
        for item_id, (rel, index, caption) in items:
            path = root / rel
            where = f"{path}" + (f"[{index}]" if index >= 0 else "")
            if cache is None or cache[0] != rel:
                with np.load(path) as z:
                    latent_key, _ = _npz_keys(z, path)
                    keys = _text_keys(z.files, path)
                    arrays = {"latent": z[latent_key]}
                    arrays.update({k: z[keys[k]] for k in ("text_emb", "text_mask", "text_pooled") if keys[k]})
                cache = (rel, arrays)
            a = {k: (v[index] if index >= 0 else v) for k, v in cache[1].items()}
            mask = np.asarray(a["text_mask"]).astype(bool)
            pooled = a["text_pooled"] if "text_pooled" in a else _masked_mean(a["text_emb"], mask)
            check_sample(a["latent"], 0, plan, where)
            yield Sample(item_id, a["latent"].astype(np.float32), 0,
                         text={"text_emb": a["text_emb"], "text_mask": mask, "text_pooled": pooled, "caption": caption,
                               "truncated": False, "where": where})

    def empty_prompt(self, plan: Plan) -> dict[str, np.ndarray]:
        if self._encoders():
            return _empty_prompt_of(cached_text_encoder(encoder_folders(self), plan.text.max_length, self.device,
                                                        self.encoder_dtype))
        return self._read_empty_file(plan.text)


def _masked_mean(emb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    return (emb.astype(np.float32) * m).sum(-2) / max(float(m.sum()), 1.0)
