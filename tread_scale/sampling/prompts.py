"""Prompts of a text-to-image model: encoded with the dataset's encoders, or read from the dataset itself.

A :class:`PromptSet` is what sampling a text-conditioned network needs: the prompt strings (for captions
beside the grid) and their :class:`~tread_scale.models.conditioning.TextCondition`. It comes from

* :func:`encode_prompts`: prompts encoded with local encoder folders, checked first against the encoders the
  training data was converted with (content hashes recorded with the data and the weights), or
* :func:`dataset_prompts`: the captions and stored embeddings of a captioned dataset's first samples (no
  encoder needed), read directly from the shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tread_scale.errors import ConfigError, DatasetError
from tread_scale.models.conditioning import TextCondition

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts and their encoding: sample ``i`` of a generation uses prompt ``i % len(prompts)``.

    Attributes:
        prompts: The prompt strings.
        condition: Their :class:`TextCondition`, one row per prompt (float32, on the CPU unless moved).
    """

    prompts: list[str]
    condition: TextCondition

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.condition):
            raise ValueError(f"a PromptSet needs one condition row per prompt, got {len(self.prompts)} prompts and "
                             f"{len(self.condition)} rows")

    def __len__(self) -> int:
        return len(self.prompts)

    def for_samples(self, indices: Sequence[int], device: torch.device | str | None = None) -> TextCondition:
        """The condition of samples ``indices`` (sample ``i`` takes prompt ``i % len(self)``), float32."""
        rows = [i % len(self) for i in indices]
        return self.condition.select(rows).to(device, torch.float32)


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file, one a line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ConfigError: If the file does not exist or holds no prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts {str(path)!r}: no such file (one prompt a line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {str(path)!r}: the file holds no prompt (one a line; '#' starts a comment)")
    return prompts


def encode_prompts(prompts: Sequence[str], text_meta, *, t5: str | None = None, clip: str | None = None,
                   clip_l: str | None = None, clip_g: str | None = None, device: torch.device | str = "cpu",
                   where: str = "the training data", flag_prefix: str = "--") -> PromptSet:
    """Encode ``prompts`` exactly as the training captions were encoded.

    The encoder folders are first checked against ``text_meta`` (kinds and content hashes of weights and
    tokenizer): a different encoder would give embeddings the network never saw.

    Args:
        prompts: The prompts (at least one).
        text_meta: The data's :class:`~tread_scale.data.metadata.TextMetadata` (from the dataset or the
            weights' :meth:`~tread_scale.weights.DataFacts.text_metadata`).
        t5: Local T5 folder (needed when the data used one).
        clip: Local CLIP folder (needed when the data used one).
        clip_l: Local CLIP-L folder (SD3's layout).
        clip_g: Local CLIP-G folder (SD3's layout).
        device: Where to run the encoders.
        where: What ``text_meta`` describes, for messages (e.g. the weight file).
        flag_prefix: How the caller names the folders: ``--`` (``--t5``, ``--clip-l``) or ``text.``
            (``text.t5``, ``text.clip_l``).

    Returns:
        The prompts and their condition (float32, CPU).

    Raises:
        ConfigError: If no prompt is given, a folder is missing, or the encoders are not the recorded ones.
    """
    from tread_scale.data.conversion.text_encoder import check_text_encoders
    from tread_scale.data.conversion.text_encoder import TextEncoder, encoder_flag, recorded_clip_layer

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ConfigError("no prompt given")
    recorded = {e["kind"]: e for e in text_meta.encoders}
    given = {"t5": t5, "clip": clip, "clip_l": clip_l, "clip_g": clip_g}
    for kind in given:
        flag = encoder_flag(kind) if flag_prefix == "--" else f"{flag_prefix}{kind}"
        rec = recorded.get(kind)
        if rec is not None and not given[kind]:
            raise ConfigError(f"{where} was embedded with the {kind} encoder {rec['name']!r} (sha256 "
                              f"{rec['weights_sha256'][:16]}…), but no folder of it is known: pass {flag} DIR")
        if rec is not None and not Path(given[kind]).is_dir():
            raise ConfigError(f"{flag} {given[kind]!r}: no such folder (the {kind} encoder {rec['name']!r} that "
                              f"{where} was embedded with; pass {flag} DIR where it is now)")
        if rec is None and given[kind]:
            raise ConfigError(f"{flag} {given[kind]!r}: {where} was embedded without a {kind} encoder "
                              f"(encoders: {', '.join(sorted(recorded)) or 'none recorded'}); leave {flag} out")
    check_text_encoders(text_meta, **given, where=where)
    encoder = TextEncoder.from_folders(**given, max_length=text_meta.max_length, device=device,
                                       clip_layer=recorded_clip_layer(text_meta))
    encoded = encoder.encode(prompts)
    cut = [p for p, t in zip(prompts, encoded["truncated"]) if t]
    if cut:
        log.warning("%d prompt(s) have more tokens than the encoders take (%d) and were cut: %s", len(cut),
                    text_meta.max_length, "; ".join(repr(p) for p in cut[:3]))
    cond = TextCondition.from_batch(encoded).to("cpu", torch.float32)
    return PromptSet(prompts, cond)


def dataset_prompts(remote: str, n: int, split: str | None = None) -> PromptSet:
    """The captions and stored text embeddings of a captioned dataset's first ``n`` samples.

    Reads ``index.json`` and as many shards as hold those samples straight from ``remote`` (a local folder
    or ``s3://`` prefix, compressed or not), without a ``StreamingDataset``: no cache folder, no shared
    memory, no collective, so one rank may call it alone.

    Args:
        remote: The dataset root.
        n: Samples (fewer if the dataset is smaller).
        split: The dataset's split folder, if any.

    Returns:
        Their captions and text condition (float32, CPU).

    Raises:
        DatasetError: If the dataset is missing, has no captions or cannot be read.
    """
    from tread_scale.data.metadata import decode_captions
    from tread_scale.data.stream.direct import read_first_samples

    samples = read_first_samples(remote, n, split, columns=("caption", "text_emb"),
                                 hint=" (not a captioned dataset: `tread-scale convert captions` writes them)")
    captions = decode_captions(np.stack([s["caption"] for s in samples]))
    cond = TextCondition(torch.from_numpy(np.stack([s["text_emb"] for s in samples]).astype(np.float32)),
                         torch.from_numpy(np.stack([s["text_mask"] for s in samples]).astype(bool)),
                         torch.from_numpy(np.stack([s["text_pooled"] for s in samples]).astype(np.float32)))
    return PromptSet(captions, cond)
