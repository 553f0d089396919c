"""EMA weight files: safetensors plus the config needed to rebuild the network.

Only safetensors are loaded: no pickled code is ever executed when sampling or exporting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tread_scale.errors import CheckpointError

META_KEY = "tread_scale"


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``state_dict`` (contiguous CPU copies) and ``meta`` (JSON) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_weights`.

    Raises:
        CheckpointError: If the file is missing, not safetensors (pickles are refused) or lacks the metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {str(p)!r} does not exist")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: only .safetensors weight files are loaded (pickled .pt/.ckpt files can run "
                              "arbitrary code); export EMA weights with the training run's ema/ folder")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    if raw_meta is None:
        raise CheckpointError(f"{p}: no '{META_KEY}' metadata; it was not written by tread_scale")
    return tensors, json.loads(raw_meta)
