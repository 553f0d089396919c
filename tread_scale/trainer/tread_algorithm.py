"""``TREADRouting``: the Composer Algorithm that applies TREAD token routing to any Routable model (DiT, MMDiT)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.routing.flops import routed_flops_fraction
from tread_scale.routing.protocol import Routable
from tread_scale.routing.router import TokenRouter
from tread_scale.routing.routes import Route, resolve_routes
from tread_scale.routing.schedule import RouteSchedule
from tread_scale.trainer.model import dit_of

log = logging.getLogger(__name__)


class TREADRouting(Algorithm):
    """Attach TREAD routing to the network at ``Event.INIT`` (before DDP/FSDP wrapping).

    The network (``model.net``, or the model itself) is used only through the
    :class:`~tread_scale.routing.protocol.Routable` protocol, so any model family that implements it can be
    routed. Routing is on for training batches and off in eval mode (the network routes only when
    ``self.training``).
    Each rank draws its own subsets from the stream ``(seed, rank)``; the stream's position is saved in
    checkpoints through :meth:`state_dict` and restored by :meth:`load_state_dict`.

    With a ``schedule``, every ``Event.BATCH_START`` sets the router's rate factor for the batch about to be
    trained from the batch index (``state.timestamp.batch``), logs ``tread/rate_factor`` and says when a
    stage begins. The factor depends on the batch index only, so a resumed run routes exactly as an
    uninterrupted one, in whichever stage it resumes.

    Args:
        routes: Routes ``{rate, start, end}``; validated against the model depth at INIT.
        seed: Base seed of the routing stream.
        schedule: Factor on the rates by batch (default: the full rates throughout).

    Raises:
        RuntimeError: At INIT, if the network is not Routable or already has a router (applied twice).
    """

    def __init__(self, routes: Sequence[Route], seed: int = 0, schedule: RouteSchedule | None = None) -> None:
        self.routes = [r if isinstance(r, Route) else Route(r.rate, r.start, r.end) for r in routes]
        self.seed = int(seed)
        self.schedule = schedule or RouteSchedule()
        self.schedule.check()
        self.router: TokenRouter | None = None
        self._pending: dict[str, Any] | None = None
        self._factor: float | None = None

    def __repr__(self) -> str:
        return (f"TREADRouting(routes={[r.describe() for r in self.routes]}, seed={self.seed}, "
                f"schedule={self.schedule.describe()})")

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT or (event == Event.BATCH_START and not self.schedule.is_constant)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            self._set_factor(int(state.timestamp.batch), logger)
            return
        net = dit_of(state.model)
        if not isinstance(net, Routable):
            raise RuntimeError(f"TREADRouting needs a model with a block stack that implements the Routable protocol "
                               f"(`depth`, `routable_tokens`, `router`, `attach_router`, `block_flops`); "
                               f"got {type(net).__name__}")
        if net.router is not None:
            raise RuntimeError("TREADRouting was applied twice: the model already has a router")
        router = TokenRouter(self.routes, seed=self.seed, rank=dist.get_global_rank())
        net.attach_router(router)
        self.router = router
        if self._pending is not None:
            router.load_routing_state(self._pending)
            self._pending = None
        resolved = resolve_routes(self.routes, net.depth)
        fraction = routed_flops_fraction(net, resolved)
        if dist.get_global_rank() == 0:
            log.info("TREAD routing: %s over %d blocks, %d routable tokens; block FLOPs %.3f of dense (%.2fx fewer)",
                     ", ".join(f"{r.start}->{r.end} @ {r.rate}" for r in resolved), net.depth, net.routable_tokens,
                     fraction, 1 / fraction)
        if not self.schedule.is_constant and dist.get_global_rank() == 0:
            log.info("TREAD routing schedule (batches): %s", self.schedule.describe())
        logger.log_hyperparameters({
            "tread/routes": [{"rate": r.rate, "start": r.start, "end": r.end} for r in resolved],
            "tread/block_flops_fraction": fraction,
            "tread/schedule": self.schedule.describe(),
        })

    def _set_factor(self, batch: int, logger: Logger) -> None:
        factor = self.schedule.factor(batch)
        if self.router is not None:
            self.router.rate_factor = factor
        if factor != self._factor and dist.get_global_rank() == 0:
            rates = ", ".join(f"{r.rate * factor:.4g}" for r in self.routes)
            log.info("TREAD routing from batch %d: %s (rate factor %.4g; rates %s)", batch,
                     "dense" if factor == 0 else "full rates" if factor == 1 else "ramping", factor, rates)
        self._factor = factor
        logger.log_metrics({"tread/rate_factor": factor})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["routes"] = [{"rate": r.rate, "start": r.start, "end": r.end} for r in self.routes]
        state["schedule"] = dataclasses.asdict(self.schedule)
        state["router"] = self.router.routing_state() if self.router is not None else self._pending
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [Route(**r) for r in state.get("routes", [])]
        if saved and saved != self.routes:
            log.warning("resuming with routes %s; the checkpoint was trained with %s",
                        [r.describe() for r in self.routes], [r.describe() for r in saved])
        saved_schedule = state.get("schedule")
        if saved_schedule is not None and RouteSchedule(**saved_schedule) != self.schedule:
            log.warning("resuming with routing schedule %s; the checkpoint was trained with %s",
                        self.schedule.describe(), RouteSchedule(**saved_schedule).describe())
        router_state = state.get("router")
        if router_state is None:
            return
        if self.router is not None:
            self.router.load_routing_state(router_state)
        else:
            self._pending = dict(router_state)


def build_algorithms(cfg) -> list[Algorithm]:
    """The run's Composer algorithms: TREAD routing (when routes are set) and gradient clipping.

    DeepSpeed clips inside its own step (``gradient_clipping`` in its config), so no clipping algorithm then.
    """
    from composer.algorithms import GradientClipping

    algorithms: list[Algorithm] = []
    if cfg.routes:
        algorithms.append(TREADRouting(cfg.routes, seed=cfg.routing_seed, schedule=cfg.routing.schedule))
    if cfg.optimizer.grad_clip_norm is not None and cfg.parallelism.backend != "deepspeed":
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.optimizer.grad_clip_norm))
    return algorithms
