"""Text encoders from local folders: captions → per-token embeddings, attention mask and pooled embedding.

Plain torch + transformers (no Composer), used once at conversion (``tread-scale convert captions``) and
again by sampling, to encode prompts exactly as the dataset's captions were encoded. Nothing is
downloaded: each encoder is a folder written by ``save_pretrained`` holding the model *and* its tokenizer,
loaded with ``local_files_only``.

Kinds: ``t5`` (a ``T5EncoderModel``; ``mt5``/``umt5`` folders load their own encoder classes), and ``clip``,
``clip_l``, ``clip_g`` (each a ``CLIPTextModel`` or ``CLIPTextModelWithProjection``, the class named in
``config.json``). They combine in one of two layouts:

``concat`` (``--t5`` and/or ``--clip``):

* Tokens: T5's last hidden state; CLIP's penultimate one (``hidden_layer`` -2, as SD3 and mosaicml/diffusion
  take it; datasets converted before it was recorded hold the last, after the final layer norm, recorded
  as -1, and prompts for them are encoded that way), each
  padded to ``length`` tokens (``max_length``; for CLIP at most its ``max_position_embeddings``). With both,
  the CLIP tokens come first and the T5 tokens after them (sequence ``length_clip + length_t5``), each
  zero-padded on the feature axis to the wider of the two.
* Mask: the tokenizers' attention masks, concatenated the same way (``True`` = a real token). The mask is
  also given to the encoders, so padding never changes the real tokens' embeddings.
* Pooled: CLIP's projected output (``text_embeds``) for a ``CLIPTextModelWithProjection``, its
  ``pooler_output`` for a ``CLIPTextModel``; without CLIP, the masked mean of the T5 tokens.

``sd3`` (``--clip-l``, ``--clip-g`` and ``--t5`` together): exactly what diffusers'
``StableDiffusion3Pipeline.encode_prompt`` computes (tested against it), so SD3-precomputed embeddings and
ours agree and SD3 weights see what they were trained on:

* Tokens: CLIP-L's and CLIP-G's penultimate hidden states (77 tokens each) concatenated along features
  (768 + 1280 = 2048 for SD3's encoders), zero-padded to the T5 width (4096), then T5's ``max_length``
  tokens (256): 333 tokens of width 4096. As in the pipeline, the encoders see no attention mask.
* Mask: the CLIP tokenizers' masks (either's token) for the first 77, then T5's.
* Pooled: CLIP-L's and CLIP-G's projected outputs concatenated (2048).

Encoding runs in float32 unless told otherwise; outputs are float16 (as stored in datasets).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tread_scale.data.metadata import LatentMetadata, TextMetadata
from tread_scale.errors import ConfigError, DatasetMismatchError

log = logging.getLogger(__name__)

KINDS = ("t5", "clip", "clip_l", "clip_g")
CLIP_KINDS = ("clip", "clip_l", "clip_g")
#: The hidden state CLIP tokens are taken from in new conversions (SD3's penultimate layer).
CLIP_LAYER = -2
#: Files holding weights (hashed as the encoder's weights), and files holding the tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
_MODEL_TYPES = {"t5": ("t5", "mt5", "umt5"), **{k: ("clip_text_model",) for k in CLIP_KINDS}}
_HASHES: dict[tuple, tuple[str, str]] = {}
#: Most unknown words a warning names (:func:`warn_unknown_words`).
UNKNOWN_WORDS_SHOWN = 10
#: Most distinct unknown words :func:`merge_unknown_words` keeps per encoder (the others are only counted).
UNKNOWN_WORDS_KEPT = 1000


@dataclass(frozen=True)
class EncoderInfo:
    """The facts of one encoder folder (read from its ``config.json``; nothing loaded).

    Attributes:
        kind: ``t5``, ``clip``, ``clip_l`` or ``clip_g``.
        path: The folder, resolved.
        model_class: The transformers class that loads it.
        width: Width of its token embeddings.
        pooled_width: Width of its pooled output (CLIP: projection or hidden size; T5: its width).
        position_limit: Most tokens it takes (CLIP's positions), ``None`` for T5 (relative positions).
        weights_sha256: Content hash of its weight files.
        tokenizer_sha256: Content hash of its tokenizer files.
    """

    kind: str
    path: str
    model_class: str
    width: int
    pooled_width: int
    position_limit: int | None
    weights_sha256: str
    tokenizer_sha256: str

    @property
    def name(self) -> str:
        return Path(self.path).name

    def record(self, length: int, hidden_layer: int = -1) -> dict:
        """The encoder's entry in the dataset metadata's ``text.encoders`` (CLIP's also its ``hidden_layer``)."""
        out = {"kind": self.kind, "name": self.name, "model_class": self.model_class, "width": self.width,
               "pooled_width": self.pooled_width, "length": length, "weights_sha256": self.weights_sha256,
               "tokenizer_sha256": self.tokenizer_sha256}
        if self.kind in CLIP_KINDS:
            out["hidden_layer"] = hidden_layer
        return out


def folder_hashes(folder: str | os.PathLike) -> tuple[str, str]:
    """Content hashes ``(weights, tokenizer)`` of an encoder folder (sha256 over file names and bytes).

    Weight files are those ending in :data:`WEIGHT_SUFFIXES` (anywhere under the folder), tokenizer files
    those named in :data:`TOKENIZER_FILES`. Hashing reads every weight byte (seconds per GB); results are
    remembered per process while the files' sizes and modification times stay the same.
    """
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    tokenizer = [p for p in files if p.name in TOKENIZER_FILES]
    key = (str(root), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights + tokenizer))
    if key not in _HASHES:
        _HASHES[key] = (_hash_files(root, weights), _hash_files(root, tokenizer))
    return _HASHES[key]


def _hash_files(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def inspect_encoder(folder: str | os.PathLike, kind: str) -> EncoderInfo:
    """Read an encoder folder's facts and check that it holds a model of ``kind`` and a tokenizer.

    Raises:
        ConfigError: Naming the folder, if it is missing, lacks ``config.json``, weights or tokenizer files,
            or holds another kind of model.
    """
    if kind not in KINDS:
        raise ConfigError(f"text encoder kind {kind!r} is not one of {KINDS}")
    p = Path(folder)
    flag = f"{encoder_flag(kind)} {str(folder)!r}"
    if not (p / "config.json").is_file():
        raise ConfigError(f"{flag}: no config.json there; expected a local folder written by save_pretrained "
                          "(model and tokenizer; nothing is downloaded)")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except ValueError as e:
        raise ConfigError(f"{flag}: config.json is not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES[kind]:
        hint = " (a full CLIPModel: save its text model with CLIPTextModelWithProjection.save_pretrained)" \
            if model_type == "clip" else ""
        raise ConfigError(f"{flag}: config.json has model_type {model_type!r}, expected one of "
                          f"{_MODEL_TYPES[kind]}{hint}")
    if not any(n in os.listdir(p) for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json", "vocab.json")):
        raise ConfigError(f"{flag}: no tokenizer files there (save the tokenizer with save_pretrained into the "
                          "same folder)")
    weights, tokenizer = folder_hashes(p)
    if not any(q.name.endswith(WEIGHT_SUFFIXES) for q in p.rglob("*")):
        raise ConfigError(f"{flag}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) there")
    if kind == "t5":
        cls = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}[model_type]
        width = int(cfg["d_model"])
        return EncoderInfo(kind, str(p.resolve()), cls, width, width, None, weights, tokenizer)
    archs = cfg.get("architectures") or []
    cls = "CLIPTextModelWithProjection" if "CLIPTextModelWithProjection" in archs else "CLIPTextModel"
    width = int(cfg["hidden_size"])
    pooled = int(cfg.get("projection_dim", 512)) if cls == "CLIPTextModelWithProjection" else width
    return EncoderInfo(kind, str(p.resolve()), cls, width, pooled, int(cfg.get("max_position_embeddings", 77)),
                       weights, tokenizer)


def encoder_flag(kind: str) -> str:
    """The command-line option of an encoder kind: ``--t5``, ``--clip``, ``--clip-l``, ``--clip-g``."""
    return "--" + kind.replace("_", "-")


@dataclass(frozen=True)
class TextLayout:
    """How encoders combine into one token sequence (see the module docstring).

    Attributes:
        encoders: The encoders, in sequence order (CLIP first).
        lengths: Tokens of each encoder.
        max_length: The requested token limit.
        seq_len: Tokens in all (``sum(lengths)``).
        emb_dim: Token width (the widest encoder's).
        pooled_dim: Pooled width.
        pooled: Where the pooled embedding comes from: ``clip``, ``t5_mean`` or ``clip_l+clip_g``.
        style: ``concat`` or ``sd3`` (see the module docstring).
        clip_layer: The hidden state CLIP tokens come from (-2: penultimate; -1: last, older datasets).
    """

    encoders: tuple[EncoderInfo, ...]
    lengths: tuple[int, ...]
    max_length: int
    seq_len: int
    emb_dim: int
    pooled_dim: int
    pooled: str
    style: str = "concat"
    clip_layer: int = CLIP_LAYER

    def records(self) -> list[dict]:
        return [e.record(n, self.clip_layer) for e, n in zip(self.encoders, self.lengths)]


def text_layout(t5: EncoderInfo | None, clip: EncoderInfo | None, max_length: int, *,
                clip_l: EncoderInfo | None = None, clip_g: EncoderInfo | None = None,
                clip_layer: int = CLIP_LAYER) -> TextLayout:
    """Combine encoder facts into a :class:`TextLayout` (``sd3`` when CLIP-L and CLIP-G are given).

    Raises:
        ConfigError: If no encoder is given, the SD3 trio is incomplete or mixed with ``--clip``, or
            ``max_length`` is not positive.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be >= 1, got {max_length}")
    if clip_l is not None or clip_g is not None:
        if clip_l is None or clip_g is None or t5 is None or clip is not None:
            raise ConfigError("SD3's text layout takes --clip-l, --clip-g and --t5 together (and no --clip); given: "
                              + ", ".join(encoder_flag(k) for k, e in (("t5", t5), ("clip", clip), ("clip_l", clip_l),
                                                                        ("clip_g", clip_g)) if e is not None))
        clip_len = min(clip_l.position_limit or 77, clip_g.position_limit or 77)
        encoders = (clip_l, clip_g, t5)
        return TextLayout(encoders, (clip_len, clip_len, max_length), max_length, clip_len + max_length,
                          max(clip_l.width + clip_g.width, t5.width), clip_l.pooled_width + clip_g.pooled_width,
                          "clip_l+clip_g", "sd3", CLIP_LAYER)
    if t5 is None and clip is None:
        raise ConfigError("no text encoder: give a T5 folder (--t5), a CLIP folder (--clip), both, or SD3's trio "
                          "(--clip-l, --clip-g, --t5)")
    encoders = tuple(e for e in (clip, t5) if e is not None)
    lengths = tuple(min(max_length, e.position_limit or max_length) for e in encoders)
    pooled = clip.pooled_width if clip is not None else t5.width
    return TextLayout(encoders, lengths, max_length, sum(lengths), max(e.width for e in encoders), pooled,
                      "clip" if clip is not None else "t5_mean", "concat", clip_layer)


def _model_class(name: str):
    import transformers

    return getattr(transformers, name)


class TextEncoder:
    """Encodes captions with local T5 and/or CLIP text encoders (see the module docstring).

    Build with :meth:`from_folders`. Deterministic: the same captions in the same batches give the same
    bits on the same device (eval mode, no dropout, fixed padding to ``length``).

    Attributes:
        layout: How the encoders combine (sequence length, widths).
    """

    def __init__(self, layout: TextLayout, tokenizers: list, models: list, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.layout = layout
        self.tokenizers = tokenizers
        self.models = models
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_folders(cls, t5: str | os.PathLike | None = None, clip: str | os.PathLike | None = None, *,
                     clip_l: str | os.PathLike | None = None, clip_g: str | os.PathLike | None = None,
                     max_length: int = 77, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, clip_layer: int = CLIP_LAYER) -> TextEncoder:
        """Load the encoders (and their tokenizers) from local ``save_pretrained`` folders.

        Args:
            t5: Folder of a T5 encoder and its tokenizer.
            clip: Folder of a CLIP text model and its tokenizer.
            clip_l: CLIP-L's folder (SD3's layout, with ``clip_g`` and ``t5``).
            clip_g: CLIP-G's folder (SD3's layout).
            max_length: Tokens per encoder (CLIP: at most its position limit; SD3's layout: T5's tokens).
            device: Where to run them.
            dtype: Compute dtype (float32 by default; T5 overflows in float16, use bfloat16 to save memory).
            clip_layer: The ``concat`` layout's CLIP hidden state (-2 penultimate; -1 for older datasets).

        Raises:
            ConfigError: Naming the folder that is missing, of the wrong kind, or cannot be loaded.
        """
        from transformers import AutoTokenizer

        folders = {"t5": t5, "clip": clip, "clip_l": clip_l, "clip_g": clip_g}
        infos = {k: inspect_encoder(f, k) for k, f in folders.items() if f is not None}
        layout = text_layout(infos.get("t5"), infos.get("clip"), max_length, clip_l=infos.get("clip_l"),
                             clip_g=infos.get("clip_g"), clip_layer=clip_layer)
        device = torch.device(device)
        tokenizers, models = [], []
        for info in layout.encoders:
            try:
                tok = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
                model = _model_class(info.model_class).from_pretrained(info.path, local_files_only=True, dtype=dtype)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{encoder_flag(info.kind)} {info.path!r}: cannot load a {info.model_class} and its "
                                  f"tokenizer: {e}") from None
            if tok.pad_token is None:
                raise ConfigError(f"{encoder_flag(info.kind)} {info.path!r}: its tokenizer has no pad token")
            tokenizers.append(tok)
            models.append(model.to(device).eval().requires_grad_(False))
        log.info("text encoders %s (%s layout): %d tokens of width %d, pooled width %d (%s)",
                 ", ".join(f"{e.kind}={e.name}" for e in layout.encoders), layout.style, layout.seq_len,
                 layout.emb_dim, layout.pooled_dim, layout.pooled)
        return cls(layout, tokenizers, models, device, dtype)

    @classmethod
    def for_dataset(cls, text_meta, t5: str | None = None, clip: str | None = None, *, clip_l: str | None = None,
                    clip_g: str | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> TextEncoder:
        """The encoders a dataset was converted with, checked against its metadata (for sampling prompts).

        Encodes as the dataset was encoded: its layout and its recorded CLIP hidden layer (-1 when older
        metadata records none).

        Args:
            text_meta: The dataset's :class:`~tread_scale.data.metadata.TextMetadata` (``meta.text``).
            t5: Local T5 folder (needed when the dataset used one).
            clip: Local CLIP folder (needed when the dataset used one).
            clip_l: Local CLIP-L folder (SD3's layout).
            clip_g: Local CLIP-G folder (SD3's layout).
            device: Where to run them.
            dtype: Compute dtype.

        Raises:
            ConfigError: If the folders are not the encoders the dataset records.
        """
        check_text_encoders(text_meta, t5=t5, clip=clip, clip_l=clip_l, clip_g=clip_g)
        return cls.from_folders(t5=t5, clip=clip, clip_l=clip_l, clip_g=clip_g, max_length=text_meta.max_length,
                                device=device, dtype=dtype, clip_layer=recorded_clip_layer(text_meta))

    @torch.no_grad()
    def encode(self, captions: Sequence[str], batch_size: int | None = None,
               out_dtype: torch.dtype = torch.float16, warn_unknown: str | None = "prompt") -> dict[str, Any]:
        """Encode captions.

        Words an encoder's tokenizer does not know become its unknown token (``<unk>``), which carries no
        meaning: one warning per call names them (:func:`warn_unknown_words`), unless ``warn_unknown`` is
        ``None`` (the caller then reports ``unknown`` itself, e.g. once for a whole conversion).

        Args:
            captions: The texts.
            batch_size: Captions per forward (all at once when ``None``).
            out_dtype: Dtype of the returned embeddings (float16: what datasets store).
            warn_unknown: What the texts are called in the warning about unknown words (``prompt``,
                ``caption``), or ``None`` for no warning.

        Returns:
            ``text_emb`` ``(B, seq_len, emb_dim)``, ``text_mask`` ``(B, seq_len)`` bool, ``text_pooled``
            ``(B, pooled_dim)`` (tensors on the CPU); per caption: ``truncated``, whether it had more tokens
            than an encoder's ``length`` (it was cut), ``tokens``, encoder kind → its token count before
            truncation (special tokens included, as ``length`` counts them), and ``unknown``, encoder kind →
            the words it encoded as its unknown token (``None`` for one its tokenizer cannot map back to a
            word; kinds without unknown words left out).
        """
        captions = [str(c) for c in captions]
        step = batch_size or max(len(captions), 1)
        parts = [self._encode(captions[i:i + step], out_dtype) for i in range(0, len(captions), step)]
        if not parts:
            lay = self.layout
            return {"text_emb": torch.zeros(0, lay.seq_len, lay.emb_dim, dtype=out_dtype),
                    "text_mask": torch.zeros(0, lay.seq_len, dtype=torch.bool),
                    "text_pooled": torch.zeros(0, lay.pooled_dim, dtype=out_dtype), "truncated": [], "tokens": [],
                    "unknown": []}
        out = {"text_emb": torch.cat([p["text_emb"] for p in parts]),
               "text_mask": torch.cat([p["text_mask"] for p in parts]),
               "text_pooled": torch.cat([p["text_pooled"] for p in parts]),
               **{k: [x for p in parts for x in p[k]] for k in ("truncated", "tokens", "unknown")}}
        if warn_unknown is not None:
            unknown: dict[str, dict] = {}
            for row in out["unknown"]:
                merge_unknown_words(unknown, row, self.unk_tokens)
            warn_unknown_words(unknown, warn_unknown)
        return out

    @property
    def unk_tokens(self) -> dict[str, str]:
        """Encoder kind → its tokenizer's unknown token (e.g. ``<unk>``)."""
        return {info.kind: str(tok.unk_token) for info, tok in zip(self.layout.encoders, self.tokenizers)}

    def _tokens(self, info: EncoderInfo, tok, captions: list[str], length: int, facts: dict[str, list]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask padded to ``length`` (on the device); ``facts`` updated with the
        captions this tokenizer had to cut (``truncated``), their token counts (``tokens``) and the words it
        does not know (``unknown``)."""
        fast = bool(getattr(tok, "is_fast", False))
        full = tok(captions, add_special_tokens=True, truncation=False, return_attention_mask=False,
                   return_special_tokens_mask=True, return_offsets_mapping=fast, verbose=False)
        for j, ids in enumerate(full["input_ids"]):
            facts["truncated"][j] = facts["truncated"][j] or len(ids) > length
            facts["tokens"][j][info.kind] = len(ids)
            words = _unknown_words(tok, full, j, captions[j], fast)
            if words:
                facts["unknown"][j][info.kind] = words
        batch = tok(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt",
                    return_token_type_ids=False)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @staticmethod
    def _facts(n: int) -> dict[str, list]:
        return {"truncated": [False] * n, "tokens": [{} for _ in range(n)], "unknown": [{} for _ in range(n)]}

    def _encode(self, captions: list[str], out_dtype: torch.dtype) -> dict[str, Any]:
        if self.layout.style == "sd3":
            return self._encode_sd3(captions, out_dtype)
        lay = self.layout
        embs, masks, pooled = [], [], None
        facts = self._facts(len(captions))
        for info, length, tok, model in zip(lay.encoders, lay.lengths, self.tokenizers, self.models):
            ids, mask = self._tokens(info, tok, captions, length, facts)
            penultimate = info.kind == "clip" and lay.clip_layer != -1
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=penultimate)
            # -1 is the last hidden state *after* CLIP's final layer norm (what older datasets hold)
            hidden = (out.hidden_states[lay.clip_layer] if penultimate else out.last_hidden_state).float()
            if info.kind == "clip":
                pooled = (out.text_embeds if info.model_class == "CLIPTextModelWithProjection"
                          else out.pooler_output).float()
            elif lay.pooled == "t5_mean":
                m = mask[..., None].float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            embs.append(torch.nn.functional.pad(hidden, (0, lay.emb_dim - hidden.shape[-1])))
            masks.append(mask.bool())
        return {"text_emb": torch.cat(embs, dim=1).to(out_dtype).cpu(),
                "text_mask": torch.cat(masks, dim=1).cpu(),
                "text_pooled": pooled.to(out_dtype).cpu(), **facts}

    def _encode_sd3(self, captions: list[str], out_dtype: torch.dtype) -> dict[str, Any]:
        """SD3's layout, as ``StableDiffusion3Pipeline.encode_prompt`` computes it (module docstring)."""
        lay = self.layout
        facts = self._facts(len(captions))
        clip_tokens, clip_pooled, clip_mask, t5 = [], [], None, None
        for info, length, tok, model in zip(lay.encoders, lay.lengths, self.tokenizers, self.models):
            ids, mask = self._tokens(info, tok, captions, length, facts)
            mask = mask.bool()
            if info.kind == "t5":
                t5 = (model(input_ids=ids).last_hidden_state.float(), mask)
                continue
            out = model(input_ids=ids, output_hidden_states=True)
            clip_tokens.append(out.hidden_states[lay.clip_layer].float())
            clip_pooled.append((out.text_embeds if info.model_class == "CLIPTextModelWithProjection"
                                else out.pooler_output).float())
            clip_mask = mask if clip_mask is None else clip_mask | mask
        clip = torch.nn.functional.pad(torch.cat(clip_tokens, dim=-1), (0, lay.emb_dim - sum(
            t.shape[-1] for t in clip_tokens)))
        t5_emb = torch.nn.functional.pad(t5[0], (0, lay.emb_dim - t5[0].shape[-1]))
        return {"text_emb": torch.cat([clip, t5_emb], dim=1).to(out_dtype).cpu(),
                "text_mask": torch.cat([clip_mask, t5[1]], dim=1).cpu(),
                "text_pooled": torch.cat(clip_pooled, dim=-1).to(out_dtype).cpu(), **facts}


def _unknown_words(tok, full, j: int, caption: str, fast: bool) -> list[str | None]:
    """The words of caption ``j`` of the tokenization ``full`` that became the unknown token, in order, each once.

    A word is mapped back through the fast tokenizer's word ids (the whole word as written), else its token's
    character offsets; ``None`` stands for an unknown token that cannot be mapped (a slow tokenizer). Special
    tokens added by the tokenizer are skipped (CLIP's unknown token is also its end-of-text token).
    """
    unk = tok.unk_token_id
    if unk is None:
        return []
    ids, special = full["input_ids"][j], full["special_tokens_mask"][j]
    positions = [p for p, (t, sp) in enumerate(zip(ids, special)) if t == unk and not sp]
    if not positions:
        return []
    if not fast:
        return [None] * len(positions)
    word_ids = full.word_ids(j)
    words: list[str | None] = []
    for p in positions:
        span = None
        if word_ids[p] is not None:
            span = full.word_to_chars(j, word_ids[p])
            span = (span.start, span.end) if span is not None else None
        if span is None:
            span = tuple(full["offset_mapping"][j][p])
        word = caption[span[0]:span[1]] if span[1] > span[0] else None
        if word is None or word not in words:
            words.append(word)
    return words


def merge_unknown_words(into: dict[str, dict], unknown: Mapping[str, Any], unk_tokens: Mapping[str, str]
                        ) -> dict[str, dict]:
    """Add the unknown words of one caption (or a merged record) to ``into``, a JSON-able record per encoder.

    Args:
        into: Encoder kind → ``{"unk": token, "words": {word: occurrences}, "unnamed": n, "more": n}``, where
            ``unnamed`` counts unknown tokens that could not be mapped to a word, and ``more`` the distinct
            words beyond :data:`UNKNOWN_WORDS_KEPT` that were only counted. Updated in place.
        unknown: Encoder kind → a list of words (``None`` = unnamed), as :meth:`TextEncoder.encode` returns
            per caption, or another record like ``into``.
        unk_tokens: Encoder kind → its unknown token (:attr:`TextEncoder.unk_tokens`), for new entries.

    Returns:
        ``into``.
    """
    for kind, got in unknown.items():
        rec = into.setdefault(kind, {"unk": unk_tokens.get(kind, "<unk>"), "words": {}, "unnamed": 0, "more": 0})
        if isinstance(got, Mapping):
            counts = got["words"]
            rec["unnamed"] += got["unnamed"]
            rec["more"] += got["more"]
        else:
            counts = {}
            for w in got:
                if w is None:
                    rec["unnamed"] += 1
                else:
                    counts[w] = counts.get(w, 0) + 1
        for w, n in counts.items():
            if w in rec["words"] or len(rec["words"]) < UNKNOWN_WORDS_KEPT:
                rec["words"][w] = rec["words"].get(w, 0) + n
            else:
                rec["more"] += 1
    return into


def warn_unknown_words(unknown: Mapping[str, Mapping[str, Any]], what: str = "prompt") -> None:
    """One warning naming the words each encoder does not know (up to :data:`UNKNOWN_WORDS_SHOWN` each).

    Args:
        unknown: Records of :func:`merge_unknown_words`; nothing is logged when empty.
        what: What the texts are (``prompt``, ``caption``).
    """
    parts = []
    for kind, rec in unknown.items():
        words = list(rec["words"])
        if not words and not rec["unnamed"]:
            continue
        text = f"{what} words the encoder {kind!r} does not know (encoded as {rec['unk']}): "
        if words:
            shown = words[:UNKNOWN_WORDS_SHOWN]
            text += ", ".join(repr(w) for w in shown)
            others = len(words) - len(shown) + rec["more"]
            if others:
                text += f" and {others} more"
        if rec["unnamed"]:
            text += (", and " if words else "") + (f"{rec['unnamed']} {rec['unk']} token(s) its tokenizer cannot map "
                                                   "back to words")
        parts.append(text)
    if parts:
        log.warning("%s", "; ".join(parts))


def recorded_clip_layer(text_meta) -> int:
    """The CLIP hidden layer a dataset's tokens came from (-1, the last, when its metadata records none)."""
    layers = [e.get("hidden_layer", -1) for e in getattr(text_meta, "encoders", []) if e.get("kind") in CLIP_KINDS]
    return int(layers[0]) if layers else CLIP_LAYER


def check_text_encoders(text: TextMetadata | LatentMetadata | None, *, t5: str | None = None,
                        clip: str | None = None, clip_l: str | None = None, clip_g: str | None = None,
                        where: str = "the dataset") -> None:
    """Check that local encoder folders are the encoders a captioned dataset was converted with.

    Training calls this at start when it is given encoders (to encode prompts for sample grids), sampling
    before it encodes prompts. Compares the kinds and the content hashes of the weight and tokenizer
    files (hashing reads every weight byte once per process).

    Args:
        text: The dataset's metadata or its ``text`` section.
        t5: Local T5 folder, if any.
        clip: Local CLIP folder, if any.
        clip_l: Local CLIP-L folder, if any (SD3's layout).
        clip_g: Local CLIP-G folder, if any (SD3's layout).
        where: The dataset, for messages.

    Raises:
        DatasetMismatchError: If the dataset has no text section.
        ConfigError: Naming the encoder, the folder and both hashes (or the kinds) that differ.
    """
    if isinstance(text, LatentMetadata):
        text = text.text
    if text is None:
        raise DatasetMismatchError(f"{where} has no text embeddings (converted without captions), so no text encoder "
                                   "can match it")
    given = {k: f for k, f in (("t5", t5), ("clip", clip), ("clip_l", clip_l), ("clip_g", clip_g)) if f is not None}
    recorded = {e["kind"]: e for e in text.encoders}
    if not recorded:
        raise ConfigError(f"{where} holds precomputed text embeddings and records no encoders, so encoders "
                          f"{sorted(given)} cannot be checked against it; re-convert with the encoders to record them")
    if set(given) != set(recorded):
        had = ", ".join(f"{k}={e['name']}" for k, e in recorded.items())
        got = ", ".join(f"{k}={v}" for k, v in given.items()) or "none"
        raise ConfigError(f"{where} was converted with text encoder(s) {had}, but {got} were given; give exactly "
                          + " ".join(encoder_flag(k) for k in sorted(recorded)))
    for kind, folder in given.items():
        info, rec = inspect_encoder(folder, kind), recorded[kind]
        for field_name in ("weights_sha256", "tokenizer_sha256"):
            got, want = getattr(info, field_name), rec[field_name]
            if got != want:
                what = field_name.split("_")[0]
                raise ConfigError(f"{kind} encoder {folder!r}: its {what} (sha256 {got[:16]}…) differ from those of "
                                  f"{rec['name']!r} that {where} was converted with (sha256 {want[:16]}…); use "
                                  "the same encoder folder, or re-convert the dataset")


# --------------------------------------------------------------------------- whole-word tokenizers of tiny encoders
# (tread_scale.devtools.demo_data.build_tiny_text_encoder, tread_scale.evaluation.clip_score.build_tiny_clip)
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def _word_tokenizer(words: Sequence[str], specials: Sequence[str], template: str, model_max_length: int,
                    **tokens: str):
    """A lower-casing whole-word tokenizer over ``specials + words``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **tokens), vocab


def empty_prompt_arrays(encoded: dict[str, Any]) -> dict[str, np.ndarray]:
    """The first row of :meth:`TextEncoder.encode`'s output as stored arrays (float16 / bool)."""
    return {"text_emb": encoded["text_emb"][0].numpy().astype(np.float16),
            "text_mask": encoded["text_mask"][0].numpy().astype(bool),
            "text_pooled": encoded["text_pooled"][0].numpy().astype(np.float16)}
