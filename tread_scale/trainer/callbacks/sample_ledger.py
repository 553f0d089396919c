"""``SampleLedger``: which dataset samples each rank consumed at each step (for audits of resumption)."""

from __future__ import annotations

import json
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.jsonl import last_record_per_step


class SampleLedger(Callback):
    """Append ``{"step", "ids"}`` per batch to ``<folder>/rank<r>.jsonl``.

    A step re-run after a resume appears again; :func:`consumed` keeps the last record of each step.

    Args:
        folder: Ledger folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        ids = state.batch["id"]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"rank{dist.get_global_rank()}.jsonl").open("a") as f:
            f.write(json.dumps({"step": int(state.timestamp.batch) + 1, "ids": ids}) + "\n")


def consumed(folder: str | Path) -> dict[int, list[int]]:
    """``{step: sorted ids of every rank}``, the last record of each (rank, step) winning.

    Args:
        folder: The ledger folder (``rank<r>.jsonl`` files).
    """
    steps: dict[int, list[int]] = {}
    for path in sorted(Path(folder).glob("rank*.jsonl")):
        for rec in last_record_per_step(path):
            steps.setdefault(rec["step"], []).extend(rec["ids"])
    return {s: sorted(v) for s, v in sorted(steps.items())}
