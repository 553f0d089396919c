"""Sampling FLOPs per image, counted from the network calls a sampler actually makes.

Guidance changes what an image costs: CFG adds an unconditional forward pass per step, TREAD guidance replaces
the conditional pass by two routed ones (the strong and weak branches, each cheaper than a dense pass), and a
guidance interval applies either only at some noise levels. Rather than re-deriving each sampler's schedule,
:class:`SamplingFlops` hooks the network while it samples and adds up the analytic forward FLOPs
(:mod:`tread_scale.models.flops`) of every call: dense for a plain call, routed at the forced rate for a
TREAD-guided branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from torch import nn

from tread_scale.models.flops import mmdit_flops, model_flops
from tread_scale.routing.routes import Route


class SamplingFlops:
    """Adds up the forward FLOPs of every call of ``net`` while in use (``with SamplingFlops(net) as f:``).

    Attributes:
        total: FLOPs of every row of every call so far (padded rows included: they are computed).
        calls: Network calls so far.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.total = 0.0
        self.calls = 0
        self._cache: dict[tuple[Any, ...], float] = {}
        self._handle = None

    def __enter__(self) -> SamplingFlops:
        self._handle = self.net.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x, cond = args[0], args[2] if len(args) > 2 else kwargs.get("y")
        rate = kwargs.get("rate_override") if kwargs.get("force_routing") else None
        text_len = getattr(cond, "text_len", None)
        hw = tuple(int(v) for v in x.shape[-2:])
        key = (rate, text_len, hw)
        if key not in self._cache:
            self._cache[key] = self._flops(rate, text_len, hw)
        self.total += self._cache[key] * x.shape[0]
        self.calls += 1

    def _flops(self, rate: float | None, text_len: int | None, latent_hw: tuple[int, int]) -> float:
        router = getattr(self.net, "router", None)
        routes = [] if rate is None or router is None else [Route(rate, r.start, r.end) for r in router.routes]
        if text_len is not None:
            flops = mmdit_flops(self.net, routes, text_len=text_len, latent_hw=latent_hw)
        else:
            flops = model_flops(self.net, routes, latent_hw=latent_hw)
        return flops.routed if routes else flops.dense

    def per_image(self, rows: int) -> float:
        """FLOPs per image when ``rows`` images (padded ones included) went through the sampler."""
        return self.total / rows if rows else 0.0


T = TypeVar("T")


def counted(items: Iterable[T], counter: SamplingFlops) -> Iterator[T]:
    """``items`` (e.g. :func:`~tread_scale.sampling.generate.generate`'s batches), with ``counter`` hooked into
    the network while each is produced (and only then: other uses of the network in between are not counted)."""
    it = iter(items)
    while True:
        with counter:
            try:
                item = next(it)
            except StopIteration:
                return
        yield item
