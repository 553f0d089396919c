"""The one registry of DiT sizes (spec §2): ``DiT-{S,B,L,XL}/{2,4,8}``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tread_scale.errors import ConfigError


@dataclass(frozen=True)
class DiTSize:
    """Width and depth of a DiT family member.

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


def model_names() -> list[str]:
    """All registered names, e.g. ``DiT-XL/2``."""
    return [f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES]


def parse_model_name(name: str) -> tuple[DiTSize, int]:
    """Resolve ``DiT-<size>/<patch>`` to its size and patch.

    Args:
        name: A registered model name such as ``DiT-B/2``.

    Returns:
        The :class:`DiTSize` and the patch size.

    Raises:
        ConfigError: If the name is not registered; the message lists the nearest names.
    """
    names = model_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"model.name: unknown model {name!r}.{hint} Known: {', '.join(names)}")
    size, patch = name[len("DiT-"):].split("/")
    return DIT_SIZES[size], int(patch)
