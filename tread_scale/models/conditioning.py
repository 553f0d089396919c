"""Text conditioning of a text-to-image model: per-token embeddings, their padding mask and a pooled vector.

A :class:`TextCondition` is what :class:`tread_scale.models.mmdit.MMDiT` takes where a DiT takes labels. It
is a small batch object: it can be moved and cast, indexed along the batch, concatenated (for a CFG batch of
conditional and unconditional rows) and have some rows replaced by the empty prompt (caption dropout), the
interface :mod:`tread_scale.diffusion.conditioning` relies on (``__len__``, ``expand``, ``where``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BATCH_KEYS = ("text_emb", "text_mask", "text_pooled")


@dataclass(frozen=True, eq=False)  # no field-wise ==: tensors have no single truth value
class TextCondition:
    """A batch of encoded prompts.

    Attributes:
        emb: ``(B, L, D_text)`` float per-token embeddings (e.g. T5-XXL, ``D_text = 4096``), padded to L.
        mask: ``(B, L)`` bool, True for real tokens and False for padding. A row may be all False (an
            empty prompt whose encoder output was dropped entirely).
        pooled: ``(B, D_pool)`` float pooled embedding (e.g. CLIP-L and CLIP-G pooled, ``D_pool = 2048``).

    Raises:
        ValueError: If the shapes do not agree or the mask is not boolean.
    """

    emb: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.emb.ndim != 3 or self.mask.ndim != 2 or self.pooled.ndim != 2:
            raise ValueError(f"TextCondition needs emb (B, L, D), mask (B, L) and pooled (B, P); got "
                             f"{tuple(self.emb.shape)}, {tuple(self.mask.shape)}, {tuple(self.pooled.shape)}")
        if self.mask.shape != self.emb.shape[:2] or self.pooled.shape[0] != self.emb.shape[0]:
            raise ValueError(f"TextCondition shapes disagree: emb {tuple(self.emb.shape)}, mask "
                             f"{tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"TextCondition.mask must be bool (True = real token), got {self.mask.dtype}")

    def __len__(self) -> int:
        return self.emb.shape[0]

    @property
    def text_len(self) -> int:
        """Padded length L."""
        return self.emb.shape[1]

    @property
    def device(self) -> torch.device:
        return self.emb.device

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> TextCondition:
        """Read ``text_emb``, ``text_mask`` and ``text_pooled`` from a data batch.

        A mask stored as integers is converted to bool (non-zero = real token).

        Raises:
            KeyError: Naming the missing keys.
        """
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"a text-conditioned batch needs the keys {', '.join(BATCH_KEYS)}; missing "
                           f"{', '.join(missing)} (present: {', '.join(sorted(map(str, batch)))})")
        mask = torch.as_tensor(batch["text_mask"])
        return cls(torch.as_tensor(batch["text_emb"]), mask if mask.dtype == torch.bool else mask != 0,
                   torch.as_tensor(batch["text_pooled"]))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> TextCondition:
        """Move to ``device`` and cast the float tensors to ``dtype`` (the mask stays bool)."""
        return TextCondition(self.emb.to(device=device, dtype=dtype, non_blocking=non_blocking),
                             self.mask.to(device=device, non_blocking=non_blocking),
                             self.pooled.to(device=device, dtype=dtype, non_blocking=non_blocking))

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> TextCondition:
        """Rows ``index`` of the batch: an int (kept as a batch of one), a slice, int ids or a ``(B,)`` bool mask."""
        if isinstance(index, int):
            index = [index]
        if torch.is_tensor(index):
            index = index.to(self.device)
        return TextCondition(self.emb[index], self.mask[index], self.pooled[index])

    def expand(self, batch: int) -> TextCondition:
        """A batch-1 condition repeated ``batch`` times (views: do not write into them).

        Raises:
            ValueError: If this condition is not a batch of one.
        """
        if len(self) != 1:
            raise ValueError(f"expand() needs a batch-1 condition (the empty prompt), got a batch of {len(self)}")
        return TextCondition(self.emb.expand(batch, -1, -1), self.mask.expand(batch, -1),
                             self.pooled.expand(batch, -1))

    def pad_to(self, length: int) -> TextCondition:
        """Pad with masked zero tokens, or drop masked tail tokens, to length ``length``.

        Raises:
            ValueError: If shortening would drop a real (unmasked) token.
        """
        cur = self.text_len
        if length == cur:
            return self
        if length < cur:
            if bool(self.mask[:, length:].any()):
                raise ValueError(f"cannot shorten text from {cur} to {length} tokens: real tokens would be dropped")
            return TextCondition(self.emb[:, :length], self.mask[:, :length], self.pooled)
        b, _, d = self.emb.shape
        emb = torch.cat([self.emb, self.emb.new_zeros(b, length - cur, d)], dim=1)
        mask = torch.cat([self.mask, self.mask.new_zeros(b, length - cur)], dim=1)
        return TextCondition(emb, mask, self.pooled)

    def where(self, drop: torch.Tensor, empty: TextCondition) -> TextCondition:
        """Replace the rows where ``drop`` is true by ``empty`` (the batch-1 empty prompt): caption dropout.

        ``empty`` is moved to this condition's device and dtype and padded (or its masked tail trimmed) to
        this condition's text length.

        Args:
            drop: ``(B,)`` bool.
            empty: Batch-1 condition.

        Raises:
            ValueError: If ``drop`` does not have one entry per row or ``empty`` is not a batch of one.
        """
        if drop.shape != (len(self),):
            raise ValueError(f"drop must have shape ({len(self)},), got {tuple(drop.shape)}")
        if len(empty) != 1:
            raise ValueError(f"the empty condition must be a batch of one, got {len(empty)}")
        empty = empty.to(self.device, self.emb.dtype).pad_to(self.text_len)
        d = drop.to(device=self.device, dtype=torch.bool)
        return TextCondition(torch.where(d[:, None, None], empty.emb, self.emb),
                             torch.where(d[:, None], empty.mask, self.mask),
                             torch.where(d[:, None], empty.pooled.to(self.pooled.dtype), self.pooled))

    @staticmethod
    def cat(conds: Sequence[TextCondition]) -> TextCondition:
        """Concatenate along the batch; shorter conditions are padded with masked tokens to the longest."""
        if not conds:
            raise ValueError("cat() needs at least one TextCondition")
        length = max(c.text_len for c in conds)
        conds = [c.pad_to(length) for c in conds]
        return TextCondition(torch.cat([c.emb for c in conds]), torch.cat([c.mask for c in conds]),
                             torch.cat([c.pooled for c in conds]))
