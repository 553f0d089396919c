"""Route specifications ``{rate, start, end}`` and their validation against a model depth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tread_scale.errors import RouteError


@dataclass(frozen=True)
class Route:
    """One TREAD route: a fraction ``rate`` of tokens skips blocks ``start..end`` (inclusive, 0-based).

    Negative indices count from the end (``-1`` is the last block).

    Attributes:
        rate: Fraction of tokens that *skip* the route, ``0 <= rate < 1``.
        start: First routed block.
        end: Last routed block (inclusive).
    """

    rate: float
    start: int
    end: int

    def describe(self) -> str:
        return f"(rate={self.rate}, start={self.start}, end={self.end})"


@dataclass(frozen=True)
class ResolvedRoute:
    """A validated route with non-negative block indices."""

    rate: float
    start: int
    end: int

    @property
    def num_blocks(self) -> int:
        return self.end - self.start + 1


def scale_routes(routes: Sequence[Route], factor: float) -> list[Route]:
    """The routes with every rate multiplied by ``factor`` (a routing schedule's factor; 1 keeps them)."""
    if factor == 1.0:
        return list(routes)
    return [Route(r.rate * factor, r.start, r.end) for r in routes]


def check_rate(rate: float, where: str) -> None:
    """Raise :class:`RouteError` unless ``0 <= rate < 1``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) < 1.0:
        raise RouteError(f"{where}: rate must be a number with 0 <= rate < 1 (the fraction of tokens that skip), got {rate!r}")


def _as_route(obj: Route | Mapping, where: str) -> Route:
    if isinstance(obj, Route):
        return obj
    if isinstance(obj, Mapping):
        unknown = set(obj) - {"rate", "start", "end"}
        missing = {"rate", "start", "end"} - set(obj)
        if unknown or missing:
            raise RouteError(f"{where}: a route has exactly the keys rate, start, end; "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        return Route(rate=obj["rate"], start=obj["start"], end=obj["end"])
    if hasattr(obj, "rate") and hasattr(obj, "start") and hasattr(obj, "end"):
        return Route(rate=obj.rate, start=obj.start, end=obj.end)
    raise RouteError(f"{where}: expected a route {{rate, start, end}}, got {obj!r}")


def resolve_routes(routes: Sequence[Route | Mapping], depth: int, key: str = "routing.routes") -> list[ResolvedRoute]:
    """Validate routes against a model depth and resolve negative indices.

    Routes must be inside the depth, have ``start <= end``, be sorted and non-overlapping
    (``start[k+1] > end[k]``), and have ``0 <= rate < 1``.

    Args:
        routes: Route objects or mappings with keys ``rate``, ``start``, ``end``.
        depth: Number of blocks of the model.
        key: Config path used in error messages.

    Returns:
        The resolved routes, in order.

    Raises:
        RouteError: Naming the offending route by index and value.
    """
    resolved: list[ResolvedRoute] = []
    for k, raw in enumerate(routes):
        where = f"{key}[{k}]"
        route = _as_route(raw, where)
        where = f"{where} {route.describe()}"
        check_rate(route.rate, where)
        for name in ("start", "end"):
            value = getattr(route, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RouteError(f"{where}: {name} must be an integer block index, got {value!r}")
            if not -depth <= value < depth:
                raise RouteError(f"{where}: {name}={value} is outside a model of depth {depth} "
                                 f"(valid: {-depth}..{depth - 1})")
        start = route.start % depth
        end = route.end % depth
        if start > end:
            raise RouteError(f"{where}: start resolves to block {start}, after end block {end}")
        if resolved and start <= resolved[-1].end:
            prev = resolved[-1]
            raise RouteError(f"{where}: routes must be sorted and non-overlapping, but it starts at block {start} "
                             f"while {key}[{k - 1}] ends at block {prev.end}")
        resolved.append(ResolvedRoute(rate=float(route.rate), start=start, end=end))
    return resolved
