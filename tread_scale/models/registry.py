"""The one registry of model sizes: ``DiT-{S,B,L,XL}/{2,4,8}`` (spec §2) and ``MMDiT-{T,B,L,2B,8B}/{1,2,4,8}``.

DiT sizes are those of the DiT paper. MMDiT sizes follow SD3's rule of 64-channel heads from B upwards
(2B is SD3-medium's shape, 8B SD3.5-large's: width ``64·depth``, ``depth`` heads); B and L reuse the DiT's
widths and depths so the two families compare at equal shape; T is a CPU test size.

| name | depth | width | heads | parameters |
|---|---|---|---|---|
| MMDiT-T/2 | 4 | 64 | 4 | 0.97M |
| MMDiT-B/2 | 12 | 768 | 12 | 254.1M |
| MMDiT-L/2 | 24 | 1024 | 16 | 902.8M |
| MMDiT-2B/2 | 24 | 1536 | 24 | 2,025.8M |
| MMDiT-8B/2 | 38 | 2432 | 38 | 8,050.5M |

Parameter counts are for the :class:`~tread_scale.models.mmdit.MMDiT` defaults: T5-XXL token embeddings
(``text_dim`` 4096), CLIP-L+G pooled embeddings (``pooled_dim`` 2048), 4 latent channels, RoPE (no position
parameters), QK-norm, patch 2; ``tests/models/test_mmdit.py`` recomputes them on the meta device. (A
38-block model of width 3072 would have 12.8B parameters.)

:func:`parse_model_name` resolves DiT names only, as before; :func:`model_spec` resolves any family's name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from tread_scale.errors import ConfigError


@dataclass(frozen=True)
class DiTSize:
    """Width and depth of a DiT (or MMDiT) family member.

    Attributes:
        depth: Number of transformer blocks.
        hidden_size: Token width D.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
    """

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0


DIT_SIZES: dict[str, DiTSize] = {
    "S": DiTSize(depth=12, hidden_size=384, num_heads=6),
    "B": DiTSize(depth=12, hidden_size=768, num_heads=12),
    "L": DiTSize(depth=24, hidden_size=1024, num_heads=16),
    "XL": DiTSize(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES: tuple[int, ...] = (2, 4, 8)

MMDIT_SIZES: dict[str, DiTSize] = {
    "T": DiTSize(depth=4, hidden_size=64, num_heads=4),
    "B": DiTSize(depth=12, hidden_size=768, num_heads=12),
    "L": DiTSize(depth=24, hidden_size=1024, num_heads=16),
    "2B": DiTSize(depth=24, hidden_size=1536, num_heads=24),
    "8B": DiTSize(depth=38, hidden_size=2432, num_heads=38),
}
MMDIT_PATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8)  # 1 for highly compressed latents (e.g. 32x autoencoders)

Family = Literal["dit", "mmdit"]
_FAMILIES: dict[str, tuple[str, dict[str, DiTSize], tuple[int, ...]]] = {
    "dit": ("DiT", DIT_SIZES, PATCH_SIZES),
    "mmdit": ("MMDiT", MMDIT_SIZES, MMDIT_PATCH_SIZES),
}


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its family, size and patch.

    Attributes:
        name: The registered name, e.g. ``MMDiT-2B/2``.
        family: ``dit`` (class-conditional :class:`~tread_scale.models.dit.DiT`) or ``mmdit``
            (text-conditioned :class:`~tread_scale.models.mmdit.MMDiT`).
        size: Depth, width, heads and MLP ratio.
        patch_size: Patch side.
    """

    name: str
    family: Family
    size: DiTSize
    patch_size: int


def model_names(family: Family | None = "dit") -> list[str]:
    """Registered names of one family (``dit``, the default, e.g. ``DiT-XL/2``; ``mmdit``) or of all (None)."""
    families = list(_FAMILIES) if family is None else [family]
    return [f"{_FAMILIES[f][0]}-{s}/{p}" for f in families for s in _FAMILIES[f][1] for p in _FAMILIES[f][2]]


def model_spec(name: str) -> ModelSpec:
    """Resolve any registered name (``DiT-<size>/<patch>`` or ``MMDiT-<size>/<patch>``) to its family and size.

    Args:
        name: A registered model name such as ``DiT-B/2`` or ``MMDiT-2B/2``.

    Raises:
        ConfigError: If the name is not registered; the message lists the nearest names.
    """
    names = model_names(None)
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"model.name: unknown model {name!r}.{hint} Known: {', '.join(names)}")
    prefix, rest = name.split("-", 1)
    family = next(f for f, (p, _, _) in _FAMILIES.items() if p == prefix)
    size, patch = rest.split("/")
    return ModelSpec(name=name, family=family, size=_FAMILIES[family][1][size], patch_size=int(patch))


def parse_model_name(name: str) -> tuple[DiTSize, int]:
    """Resolve ``DiT-<size>/<patch>`` to its size and patch (DiT names only; see :func:`model_spec`).

    Args:
        name: A registered model name such as ``DiT-B/2``.

    Returns:
        The :class:`DiTSize` and the patch size.

    Raises:
        ConfigError: If the name is not registered; the message lists the nearest names.
    """
    names = model_names()
    if name not in names:
        if name in model_names("mmdit"):
            raise ConfigError(f"model.name: {name!r} is an MMDiT, not a DiT; resolve it with model_spec()")
        near = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"model.name: unknown model {name!r}.{hint} Known: {', '.join(names)}")
    size, patch = name[len("DiT-"):].split("/")
    return DIT_SIZES[size], int(patch)
