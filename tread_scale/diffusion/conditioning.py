"""The condition a network is given, and its unconditional ("null") form, for any model family.

A class-conditional DiT is conditioned on a ``(B,)`` label tensor and its null condition is the label
``num_classes``. A text-conditioned model is conditioned on a batch object (e.g.
:class:`tread_scale.models.conditioning.TextCondition`) whose null condition is the empty prompt, a batch of
one. The objectives (condition dropout for CFG) and guidance (the unconditional branch) use only the two
functions here, so they serve both families:

* a label tensor and an ``int`` null label, or
* a condition object with ``__len__``, ``expand(batch)`` and ``where(drop, null)`` and a batch-1 null.
"""

from __future__ import annotations

from typing import Any

import torch


def null_like(cond: Any, null: Any) -> Any:
    """The unconditional condition for a batch shaped like ``cond``.

    Args:
        cond: ``(B,)`` labels or a condition object of batch B.
        null: The null label (``int``) or the batch-1 null condition object.
    """
    if torch.is_tensor(cond):
        return torch.full_like(cond, int(null))
    return null.expand(len(cond))


def drop_condition(cond: Any, drop: torch.Tensor, null: Any) -> Any:
    """Replace the condition of samples where ``drop`` (``(B,)`` bool) is true by the null condition."""
    if torch.is_tensor(cond):
        return torch.where(drop, torch.full_like(cond, int(null)), cond)
    return cond.where(drop, null)
