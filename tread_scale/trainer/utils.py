"""Small helpers shared by the Composer glue."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP-style ``.module`` wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def dit_of(model: nn.Module) -> nn.Module:
    """The routed block stack's owner inside a (possibly wrapped) ComposerModel: ``model.net`` or the model."""
    model = unwrap(model)
    return getattr(model, "net", model)
