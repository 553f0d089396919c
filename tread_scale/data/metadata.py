"""The facts of a latent dataset, stored beside its shards and checked against the model config."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tread_scale.data.object_store import join_uri, read_bytes
from tread_scale.errors import DatasetError, DatasetMismatchError

META_FILE = "tread_meta.json"
FORMAT = "tread-latents/1"
#: The empty prompt's embedding of a captioned dataset (for classifier-free guidance), beside index.json.
EMPTY_PROMPT_FILE = "text_empty.npz"


@dataclass
class TextMetadata:
    """The ``text`` section of a captioned dataset's metadata: how its captions were embedded.

    Attributes:
        encoders: One entry per encoder, in sequence order (CLIP first): ``kind`` (``t5``/``clip``),
            ``name`` (folder name), ``model_class``, ``width``, ``pooled_width``, ``length`` (its tokens),
            ``weights_sha256`` and ``tokenizer_sha256`` (content hashes of the folder's weight and
            tokenizer files). Empty for precomputed embeddings converted without their encoders.
        max_length: The token limit asked for at conversion.
        seq_len: Tokens per sample, ``L`` (the sum of the encoders' lengths).
        emb_dim: Token width, ``D``.
        pooled_dim: Pooled width, ``P``.
        pooled: Where the pooled embedding comes from: ``clip``, ``t5_mean`` (masked mean of the tokens),
            ``stored`` (given with precomputed embeddings) or ``mean`` (their masked mean).
        caption_bytes: Bytes of the fixed-width ``caption`` column (UTF-8, zero-padded).
        dtype: Stored dtype of ``text_emb`` and ``text_pooled``.
        empty_prompt: File of the empty prompt's embedding, beside ``index.json``.
        empty_prompt_sha256: Hash of its arrays (:func:`empty_prompt_digest`).
        truncated: Captions that had more tokens than an encoder's length (cut at conversion).
        clipped: Captions longer than ``caption_bytes`` (the stored string is cut; embeddings are not).
        layout: How the encoders' outputs combine: ``concat`` or ``sd3`` (SD3's CLIP-L + CLIP-G + T5 layout;
            :mod:`tread_scale.data.conversion.text_encoder`).
        longest_tokens: Encoder kind → the most tokens a caption had before truncation (special tokens
            included, as ``max_length`` counts them); empty where unknown (precomputed embeddings, datasets
            converted before it was recorded).
    """

    encoders: list[dict]
    max_length: int
    seq_len: int
    emb_dim: int
    pooled_dim: int
    pooled: str
    caption_bytes: int
    dtype: str = "float16"
    empty_prompt: str = EMPTY_PROMPT_FILE
    empty_prompt_sha256: str = ""
    truncated: int = 0
    clipped: int = 0
    layout: str = "concat"
    longest_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(seq_len, emb_dim, pooled_dim)``: what :class:`~tread_scale.data.stream.dataset.LatentStreamingDataset`
        takes as ``text_shape``."""
        return (self.seq_len, self.emb_dim, self.pooled_dim)

    def encoder(self, kind: str) -> dict | None:
        return next((e for e in self.encoders if e["kind"] == kind), None)


@dataclass
class LatentMetadata:
    """Metadata record of a converted dataset.

    Attributes:
        latent_shape: ``(C, H, W)`` of every sample. For a bucketed dataset (``buckets`` set) samples have
            their bucket's shape, and this is the reference shape a model is checked against: the square
            bucket of side ``AREA`` for ``--buckets AREApx:MULT`` (its target area), the largest-area bucket
            for an explicit ``WxH,...`` list.
        dtype: Stored dtype of the ``latent`` column.
        num_classes: Number of classes; labels are ``0..num_classes-1``.
        num_samples: Samples in the dataset.
        vae: Identifier of the VAE that produced the latents, or ``none`` for pixel space.
        scaling_factor: Factor the latents were multiplied by (decode divides by it); 1 for pixel space.
        class_names: Optional names of the classes, by label.
        source: What the data was converted from.
        text: How captions were embedded (:class:`TextMetadata`); ``None`` for datasets without text,
            whose metadata file has no ``text`` key. Captioned datasets have one class
            (``num_classes=1``, every label 0).
        buckets: Aspect-ratio buckets (``tread-scale convert ... --buckets``), in sample order: one dict per
            bucket with ``latent_shape`` ``[C, h, w]``, ``image_size`` ``[H, W]`` (pixels), ``start`` and
            ``count``: its samples are ``[start, start + count)`` in the dataset's order (``index.json``),
            which is also their ``id`` unless unreadable images were skipped. Such datasets store
            ``orig_size`` (``ndarray:int32:2``, H, W of the original image) and ``crop_box``
            (``ndarray:int32:4``, top, left, height, width in original pixels) per sample. ``None`` for square
            datasets, whose metadata file has none of the three bucket keys.
        bucket_spec: The ``--buckets`` value the buckets were made from.
        crop_rule: How images were made to fit their bucket (one sentence).
    """

    latent_shape: tuple[int, int, int]
    num_classes: int
    num_samples: int
    dtype: str = "float16"
    vae: str = "none"
    scaling_factor: float = 1.0
    class_names: list[str] | None = None
    source: str = ""
    format: str = FORMAT
    extra: dict = field(default_factory=dict)
    text: TextMetadata | None = None
    buckets: list[dict] | None = None
    bucket_spec: str | None = None
    crop_rule: str | None = None

    def to_json(self) -> str:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        if self.text is None:
            del d["text"]  # datasets without captions keep exactly their former metadata
        if self.buckets is None:
            for key in BUCKET_KEYS:  # nor do square datasets
                del d[key]
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> LatentMetadata:
        try:
            d = json.loads(text)
            d["latent_shape"] = tuple(int(x) for x in d["latent_shape"])
            if d.get("text") is not None:
                d["text"] = TextMetadata(**d["text"])
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{where}: malformed dataset metadata ({type(e).__name__}: {e})") from None


#: The metadata keys of a bucketed dataset (absent from a square dataset's file).
BUCKET_KEYS = ("buckets", "bucket_spec", "crop_rule")
#: The per-sample columns of a bucketed dataset, besides ``latent``, ``label`` and ``id``.
BUCKET_COLUMNS = {"orig_size": "ndarray:int32:2", "crop_box": "ndarray:int32:4"}


def bucket_ranges(meta: LatentMetadata) -> list[tuple[int, int, tuple[int, int, int]]]:
    """``(start, stop, latent_shape)`` of each bucket, in sample order: samples ``[start, stop)`` share a shape.

    A square dataset is one range of its ``latent_shape`` over all samples.

    Raises:
        DatasetError: If the buckets do not cover ``0 .. num_samples - 1`` exactly once, in order.
    """
    if meta.buckets is None:
        return [(0, meta.num_samples, tuple(meta.latent_shape))]
    out, at = [], 0
    for k, b in enumerate(meta.buckets):
        start, count = int(b["start"]), int(b["count"])
        if start != at or count <= 0:
            raise DatasetError(f"metadata buckets[{k}] covers samples [{start}, {start + count}), expected it to "
                               f"start at {at} with at least one sample")
        out.append((start, start + count, tuple(int(x) for x in b["latent_shape"])))
        at = start + count
    if at != meta.num_samples:
        raise DatasetError(f"metadata buckets cover {at} samples but num_samples is {meta.num_samples}")
    return out


def base_range(meta: LatentMetadata, where: str, hint: str = "") -> tuple[int, int]:
    """``(start, stop)`` of the samples of the dataset's own ``latent_shape``: all of a square dataset, the base
    bucket of a bucketed one (the square of the model's size: what FID and validation compare with).

    Raises:
        DatasetError: Naming ``where``, if no bucket has the base shape (``hint`` is said after).
    """
    for start, stop, shape in bucket_ranges(meta):
        if shape == tuple(meta.latent_shape):
            return start, stop
    raise DatasetError(f"{where}: no bucket of the dataset's base shape {tuple(meta.latent_shape)}{hint}")


def bucket_of_ids(meta: LatentMetadata) -> np.ndarray:
    """The bucket index (into ``meta.buckets``) of every sample, in sample order: ``(num_samples,)`` int32.

    All zeros for a square dataset.
    """
    out = np.zeros(meta.num_samples, np.int32)
    for k, (start, stop, _) in enumerate(bucket_ranges(meta)):
        out[start:stop] = k
    return out


def read_metadata(root: str) -> LatentMetadata:
    """Read ``tread_meta.json`` from a dataset root (local folder or s3:// prefix).

    Raises:
        DatasetError: If it is missing or malformed (the message names the file).
    """
    where = join_uri(root, META_FILE)
    raw = read_bytes(where)
    if raw is None:
        raise DatasetError(f"{where} not found: {root} is not a dataset written by `tread-scale convert` "
                           "(or its conversion did not finish)")
    return LatentMetadata.from_json(raw, where)


def parse_ndarray_encoding(encoding: str) -> tuple[str, tuple[int, ...] | None]:
    """``ndarray:float16:4,32,32`` → ``("float16", (4, 32, 32))``; shape ``None`` when not static."""
    m = re.fullmatch(r"ndarray(?::(\w+))?(?::([\d,]+))?", encoding)
    if not m:
        raise DatasetError(f"column encoding {encoding!r} is not an MDS ndarray encoding")
    shape = tuple(int(x) for x in m.group(2).split(",")) if m.group(2) else None
    return m.group(1) or "unknown", shape


def check_against_model(meta: LatentMetadata, *, in_channels: int, input_size: int, num_classes: int,
                        where: str) -> None:
    """Check the dataset's facts against the model config (a bucketed dataset: its channels; whether the model
    runs each bucket's grid is the trainer's check, ``check_buckets_against_model``).

    Raises:
        DatasetMismatchError: Naming the dataset, the field and both values.
    """
    expected = (in_channels, input_size, input_size)
    if meta.buckets and meta.latent_shape[0] != in_channels:
        raise DatasetMismatchError(f"{where}: latents have {meta.latent_shape[0]} channels but the model expects "
                                   f"{in_channels} (model.in_channels)")
    if not meta.buckets and tuple(meta.latent_shape) != expected:
        raise DatasetMismatchError(
            f"{where}: latents have shape {tuple(meta.latent_shape)} (C, H, W) but the model expects {expected} "
            f"(model.in_channels={in_channels}, model.input_size={input_size})"
        )
    if meta.dtype not in ("float16", "float32", "bfloat16"):
        raise DatasetMismatchError(f"{where}: latent dtype {meta.dtype!r} is not a float type")
    if meta.num_classes > num_classes:
        raise DatasetMismatchError(
            f"{where}: dataset has {meta.num_classes} classes but model.num_classes={num_classes}; "
            "labels would be out of range"
        )


def check_text_against_model(meta: LatentMetadata, *, emb_dim: int, pooled_dim: int, where: str,
                             max_tokens: int | None = None) -> None:
    """Check a captioned dataset's text facts against a text-conditioned model.

    Args:
        meta: The dataset's metadata.
        emb_dim: Token width the model takes.
        pooled_dim: Pooled width the model takes.
        where: The dataset, for messages.
        max_tokens: Most text tokens the model takes (``None``: any).

    Raises:
        DatasetMismatchError: If the dataset has no text, or a width or the length disagrees (both values named).
    """
    t = meta.text
    if t is None:
        raise DatasetMismatchError(f"{where}: the dataset has no text embeddings (converted without captions) but "
                                   "the model is text-conditioned; convert it with `tread-scale convert captions`")
    if t.emb_dim != emb_dim:
        raise DatasetMismatchError(f"{where}: text tokens have width {t.emb_dim} (text.emb_dim) but the model takes "
                                   f"{emb_dim}")
    if t.pooled_dim != pooled_dim:
        raise DatasetMismatchError(f"{where}: pooled text embeddings have width {t.pooled_dim} (text.pooled_dim) but "
                                   f"the model takes {pooled_dim}")
    if max_tokens is not None and t.seq_len > max_tokens:
        raise DatasetMismatchError(f"{where}: {t.seq_len} text tokens per sample (text.seq_len) but the model takes at "
                                   f"most {max_tokens}")


def adopt_text_shape(model, meta: LatentMetadata, where: str) -> None:
    """Give a text-conditioned ``model`` config the dataset's text widths and length, or check its own.

    ``model.text_dim``, ``pooled_dim`` and ``text_len`` left null take the dataset's; set ones must equal it
    (``text_len`` is what ``dry-run`` plans memory and FLOPs with, so a length the run would not train with
    is an error, not a silent change).

    Raises:
        DatasetMismatchError: If the dataset has no captions or a set width or length differs.
    """
    if meta.text is None:
        raise DatasetMismatchError(f"{where}: model {model.name or 'mmdit'} is text-conditioned but the dataset "
                                   "has no text embeddings (convert it with `tread-scale convert captions`)")
    seq_len, emb_dim, pooled_dim = meta.text.shape
    if model.text_len is not None and model.text_len != seq_len:
        raise DatasetMismatchError(
            f"{where}: the dataset's captions are {seq_len} tokens ({meta.text.layout} layout: "
            + " + ".join(f"{e['kind']} {e['length']}" for e in meta.text.encoders) + ") but model.text_len="
            f"{model.text_len}; set model.text_len={seq_len} (or null to take the dataset's)")
    model.text_dim = model.text_dim or emb_dim
    model.pooled_dim = model.pooled_dim or pooled_dim
    model.text_len = seq_len
    check_text_against_model(meta, emb_dim=model.text_dim, pooled_dim=model.pooled_dim, where=where)


def text_columns(text: TextMetadata) -> dict[str, str]:
    """The MDS columns of a captioned dataset, besides ``latent``, ``label`` and ``id``."""
    return {"text_emb": f"ndarray:float16:{text.seq_len},{text.emb_dim}", "text_mask": f"ndarray:uint8:{text.seq_len}",
            "text_pooled": f"ndarray:float16:{text.pooled_dim}", "caption": f"ndarray:uint8:{text.caption_bytes}"}


def encode_caption(caption: str, width: int) -> tuple[np.ndarray, bool]:
    """A caption as ``width`` zero-padded UTF-8 bytes (cut at a character boundary); and whether it was cut."""
    raw = caption.encode("utf-8")
    clipped = len(raw) > width
    if clipped:
        raw = raw[:width].decode("utf-8", errors="ignore").encode("utf-8")
    row = np.zeros(width, np.uint8)
    row[:len(raw)] = np.frombuffer(raw, np.uint8)
    return row, clipped


def decode_captions(rows: np.ndarray) -> list[str]:
    """Stored ``caption`` rows ``(B, N)`` (or one row ``(N,)``) back to strings."""
    rows = np.atleast_2d(np.asarray(rows, np.uint8))
    return [r.tobytes().rstrip(b"\0").decode("utf-8", errors="replace") for r in rows]


def empty_prompt_digest(arrays: dict[str, Any]) -> str:
    """sha256 of the empty prompt's arrays (names, dtypes, shapes and bytes; not the npz file's bytes)."""
    h = hashlib.sha256()
    for name in ("text_emb", "text_mask", "text_pooled"):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_empty_prompt(root: str, meta: LatentMetadata | None = None) -> dict[str, Any]:
    """The empty prompt's embedding of a captioned dataset (for classifier-free guidance, caption dropout).

    Args:
        root: The dataset (local folder or ``s3://`` prefix).
        meta: Its metadata, if already read.

    Returns:
        ``text_emb`` ``(L, D)`` float16, ``text_mask`` ``(L,)`` bool and ``text_pooled`` ``(P,)`` float16
        tensors: one row of what a batch holds.

    Raises:
        DatasetError: If the dataset has no text, the file is missing, or its content differs from the
            hash in the metadata.
    """
    import torch

    if not isinstance(root, str):
        raise TypeError(f"read_empty_prompt takes the dataset's root (local folder or s3:// prefix), got {root!r}")
    meta = meta or read_metadata(root)
    if meta.text is None:
        raise DatasetError(f"{root} has no text embeddings (converted without captions), so no empty prompt")
    where = join_uri(root, meta.text.empty_prompt)
    raw = read_bytes(where)
    if raw is None:
        raise DatasetError(f"{where} not found: the empty prompt of this captioned dataset is missing; re-run the "
                           "conversion (it resumes)")
    try:
        with np.load(io.BytesIO(raw)) as z:
            arrays = {k: z[k] for k in ("text_emb", "text_mask", "text_pooled")}
    except (ValueError, KeyError, OSError) as e:
        raise DatasetError(f"{where}: malformed empty-prompt file ({type(e).__name__}: {e})") from None
    if meta.text.empty_prompt_sha256 and empty_prompt_digest(arrays) != meta.text.empty_prompt_sha256:
        raise DatasetError(f"{where}: content differs from the hash in {META_FILE} (a file of another conversion?)")
    return {"text_emb": torch.from_numpy(arrays["text_emb"].astype(np.float16)),
            "text_mask": torch.from_numpy(arrays["text_mask"].astype(bool)),
            "text_pooled": torch.from_numpy(arrays["text_pooled"].astype(np.float16))}
