"""Routing schedules: how much of each route's rate is in use at each batch of a run.

Fine-tuners see a loss spike when routing switches on at full rate, and TREAD's best FID came with a dense
phase at the end (SPRINT likewise trains sparse, then dense). A :class:`RouteSchedule` expresses both in one
run as a factor on every route's rate:

* batches ``0 .. dense_until - 1``: dense (factor 0);
* the next ``ramp_batches`` batches: the factor rises from 0 to 1 in ``ramp_levels`` equal steps;
* then the full rates (factor 1);
* from batch ``dense_from`` on (when set): dense again, to the end of the run.

The factor is a pure function of the batch index, so a resumed run continues exactly, whichever stage it
stopped in. It takes few distinct values (at most ``ramp_levels + 1``), so a compiled model sees few token
counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tread_scale.errors import RouteError


@dataclass(frozen=True)
class RouteSchedule:
    """A factor on every route's rate, by batch index (0-based; the batch being trained).

    Attributes:
        dense_until: Batches trained dense before routing starts.
        ramp_batches: Batches over which the rates rise from 0 to their full value (0: switch on at once).
        ramp_levels: Equal steps of the rise (each step is one more token count, i.e. one more compiled
            graph under ``train.compile``).
        dense_from: First batch of a final dense phase (``None``: routing to the end).
    """

    dense_until: int = 0
    ramp_batches: int = 0
    ramp_levels: int = 8
    dense_from: int | None = None

    @property
    def is_constant(self) -> bool:
        """Whether the factor is 1 at every batch (no schedule)."""
        return self.dense_until == 0 and self.ramp_batches == 0 and self.dense_from is None

    def check(self, key: str = "routing.schedule") -> None:
        """Raise :class:`RouteError` naming the key of a value that cannot be a schedule."""
        for name in ("dense_until", "ramp_batches", "ramp_levels", "dense_from"):
            value = getattr(self, name)
            if value is None and name == "dense_from":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "ramp_levels" else 0):
                low = 1 if name == "ramp_levels" else 0
                raise RouteError(f"{key}.{name} must be an integer number of batches >= {low}, got {value!r}")
        if self.dense_from is not None and self.dense_from < self.dense_until:
            raise RouteError(f"{key}.dense_from={self.dense_from} is before {key}.dense_until={self.dense_until}: "
                             f"the run would never route")

    def factor(self, batch: int) -> float:
        """The factor on the routes' rates at (0-based) batch ``batch``."""
        if batch < self.dense_until or (self.dense_from is not None and batch >= self.dense_from):
            return 0.0
        done = batch - self.dense_until
        if done >= self.ramp_batches:
            return 1.0
        levels = min(self.ramp_levels, self.ramp_batches)
        return math.floor(done * levels / self.ramp_batches) / levels

    def stages(self, total_batches: int) -> list[tuple[int, int, float]]:
        """The run's batches ``0 .. total_batches - 1`` as ``(first, last, factor)`` runs of one factor."""
        bounds = {0, total_batches, self.dense_until, self.dense_until + self.ramp_batches}
        if self.dense_from is not None:
            bounds.add(self.dense_from)
        levels = min(self.ramp_levels, self.ramp_batches)
        for k in range(1, levels):  # first batch of each ramp step: smallest done with floor(done·L/R) = k
            bounds.add(self.dense_until + math.ceil(k * self.ramp_batches / levels))
        edges = sorted(b for b in bounds if 0 <= b <= total_batches)
        out: list[tuple[int, int, float]] = []
        for first, end in zip(edges, edges[1:]):
            if first >= end:
                continue
            f = self.factor(first)
            if out and out[-1][2] == f:
                out[-1] = (out[-1][0], end - 1, f)
            else:
                out.append((first, end - 1, f))
        return out

    def mean_of(self, total_batches: int, value_at) -> float:
        """The mean over the run's batches of ``value_at(factor)`` (e.g. training FLOPs per sample)."""
        if total_batches < 1:
            return float(value_at(self.factor(0)))
        return sum((last - first + 1) * value_at(f) for first, last, f in self.stages(total_batches)) / total_batches

    def describe(self, total_batches: int | None = None) -> str:
        """The stages in words, e.g. ``dense 0-99, ramp 100-599 (8 steps), full 600-8999, dense 9000-``."""
        if self.is_constant:
            return "full rate throughout"
        parts = []
        if self.dense_until:
            parts.append(f"dense 0-{self.dense_until - 1}")
        if self.ramp_batches:
            end = self.dense_until + self.ramp_batches - 1
            parts.append(f"ramp {self.dense_until}-{end} ({min(self.ramp_levels, self.ramp_batches)} steps)")
        full_start = self.dense_until + self.ramp_batches
        if self.dense_from is None:
            parts.append(f"full from {full_start}")
        else:
            if self.dense_from > full_start:
                parts.append(f"full {full_start}-{self.dense_from - 1}")
            parts.append(f"dense from {self.dense_from}")
        text = ", ".join(parts)
        if total_batches is not None and self.dense_from is not None and self.dense_from >= total_batches:
            text += f" (not reached in {total_batches} batches)"
        return text


__all__ = ["RouteSchedule"]
