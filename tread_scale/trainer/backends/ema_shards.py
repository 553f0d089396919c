"""The EMA of a DeepSpeed run saved as per-rank fragment files next to the engine checkpoint.

Under DeepSpeed the EMA shadow is kept like ZeRO's fp32 partition: each rank holds, per parameter, a fragment
of the flattened parameter (:class:`~tread_scale.compat.deepspeed.DeepSpeedMaster`). A checkpoint saves
exactly that, without gathering: every rank writes ``<engine checkpoint>/ba<N>/ema/rank<R>-of-<W>.safetensors``
holding its fragments, one 1-D fp32 tensor per parameter named like the parameter (ranks that hold none of a
parameter leave it out). The header's ``tread_scale_ema_shard`` metadata (JSON) makes the file set
self-describing: ``rank``, ``world_size``, ``decay``, ``tag`` and per fragment the parameter's full ``shape``
and its flat element range ``[start, stop)``.

:class:`EMAShards` reads any flat range of any parameter from such a file set (memory-mapped, touching only
the files whose fragments overlap it), so a reader is not tied to the world size that wrote it:
:meth:`EMAShards.full_state_dict` rebuilds the full EMA in one process.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from tread_scale.errors import CheckpointError
from tread_scale.weights import SafetensorsWriter, read_header_json

log = logging.getLogger(__name__)

#: The header metadata key of a shard file.
SHARD_KEY = "tread_scale_ema_shard"
#: ``layout`` of the EMA's Composer state when its values are in shard files.
LAYOUT = "deepspeed-shards"
FORMAT = 1
SHARD_NAME = re.compile(r"rank(\d+)-of-(\d+)\.safetensors")


def shard_path(folder: str | Path, rank: int, world_size: int) -> Path:
    """The file of ``rank``'s EMA fragments in ``folder``."""
    return Path(folder) / f"rank{rank:05d}-of-{world_size:05d}.safetensors"


def save_ema_shard(folder: str | Path, master: Any, shadow: dict[str, torch.Tensor], decay: float, tag: str) -> Path:
    """Write this rank's EMA fragments (streamed, one tensor at a time; every rank writes its own file).

    Args:
        folder: The ``ema`` folder of the engine checkpoint's tag.
        master: The run's :class:`~tread_scale.compat.deepspeed.DeepSpeedMaster` (gives each piece's range).
        shadow: Name → this rank's EMA piece, laid out like the master's.
        decay: The EMA decay (recorded).
        tag: The engine checkpoint's tag (``ba<N>``, recorded).
    """
    fragments, specs = {}, {}
    for name in shadow:
        start, stop = master.span(name)
        if stop > start:
            fragments[name] = {"shape": list(master.full_shape(name)), "start": start, "stop": stop}
            specs[name] = (torch.float32, (stop - start,))
    meta = {"format": FORMAT, "layout": LAYOUT, "rank": master.rank, "world_size": master.world, "decay": decay,
            "tag": tag, "fragments": fragments}
    with SafetensorsWriter(shard_path(folder, master.rank, master.world), specs,
                           {SHARD_KEY: json.dumps(meta, sort_keys=True)}) as writer:
        for name in writer.order:
            n = fragments[name]["stop"] - fragments[name]["start"]
            writer.write(name, shadow[name].detach()[:n].float())
    return writer.path


class EMAShards:
    """The EMA fragment files of one checkpoint tag (all ranks' files in ``folder``), read by flat range.

    Args:
        folder: The tag's ``ema`` folder.

    Raises:
        CheckpointError: If the folder holds no shard files, a file is unreadable or lacks the metadata, or
            the files do not form one complete set (one per rank of one world size, one tag).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = sorted(p for p in self.folder.glob("rank*-of-*.safetensors") if SHARD_NAME.fullmatch(p.name))
        if not files:
            raise CheckpointError(f"{self.folder}: no EMA shard files (rank<R>-of-<W>.safetensors)")
        metas = []
        for path in files:
            meta = read_header_json(path, SHARD_KEY, "not an EMA shard file of tread_scale")
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: EMA shard format {meta.get('format')!r}, this code reads {FORMAT}")
            metas.append((path, meta))
        self.world_size = int(metas[0][1]["world_size"])
        self.decay = float(metas[0][1]["decay"])
        self.tag = str(metas[0][1]["tag"])
        ranks = sorted(int(m["rank"]) for _, m in metas)
        odd = [str(p) for p, m in metas if int(m["world_size"]) != self.world_size or m["tag"] != self.tag]
        if odd or ranks != list(range(self.world_size)):
            raise CheckpointError(f"{self.folder}: the EMA shard files do not form one set of {self.world_size} "
                                  f"ranks of tag {self.tag} (ranks found {ranks}; differing: {odd or 'none'})")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._fragments: dict[str, list[tuple[int, int, Path]]] = {}
        for path, meta in metas:
            for name, frag in meta["fragments"].items():
                shape = tuple(int(d) for d in frag["shape"])
                if self.shapes.setdefault(name, shape) != shape:
                    raise CheckpointError(f"{path}: parameter {name!r} has shape {shape} here and "
                                          f"{self.shapes[name]} in another rank's file")
                self._fragments.setdefault(name, []).append((int(frag["start"]), int(frag["stop"]), path))
        for frags in self._fragments.values():
            frags.sort()

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened parameter ``name`` (fp32, 1-D), from every file holding some.

        Raises:
            CheckpointError: If the parameter is unknown or part of the range is in no file.
        """
        from safetensors import safe_open

        if stop <= start:
            return torch.empty(0, dtype=torch.float32)
        if name not in self._fragments:
            raise CheckpointError(f"{self.folder}: the EMA shard files hold no parameter {name!r}")
        out = torch.empty(stop - start, dtype=torch.float32)
        covered = start
        for lo, hi, path in self._fragments[name]:
            a, b = max(lo, covered), min(hi, stop)
            if b <= a:
                continue
            if a != covered:
                break
            with safe_open(str(path), framework="pt") as f:
                out[a - start: b - start] = f.get_slice(name)[a - lo: b - lo]
            covered = b
        if covered < stop:
            raise CheckpointError(f"{self.folder}: elements {covered}..{stop} of EMA parameter {name!r} are in no "
                                  "shard file (a rank's file is missing or from another run)")
        return out

    def full(self, name: str) -> torch.Tensor:
        """The full fp32 EMA value of parameter ``name``."""
        shape = self.shapes.get(name)
        if shape is None:
            raise CheckpointError(f"{self.folder}: the EMA shard files hold no parameter {name!r}")
        return self.read(name, 0, math.prod(shape)).view(shape)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter's full fp32 EMA value (one process; e.g. to inspect or export offline)."""
        return {name: self.full(name) for name in sorted(self.shapes)}


__all__ = ["EMAShards", "LAYOUT", "SHARD_KEY", "SHARD_NAME", "save_ema_shard", "shard_path"]
