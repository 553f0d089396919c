"""ComposerModel adapter: a DiT plus a diffusion objective, and the ``TrainStep`` callback that feeds it the step."""

from __future__ import annotations

from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.models import ComposerModel
from torch import nn

from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.rectified_flow import RectifiedFlow
from tread_scale.models.conditioning import TextCondition
from tread_scale.models.dit import DiT
from tread_scale.models.flops import model_flops
from tread_scale.rng import mix_seed, sample_seeds

ROUTING_SALT = 0x7EAD


class DiffusionModel(ComposerModel):
    """Trains ``net`` with ``objective`` on batches ``{"latent", "label", "id"}`` (DiT) or
    ``{"latent", "text_emb", "text_mask", "text_pooled", "id"}`` (MMDiT).

    ``forward`` returns the scalar stochastic loss of the batch; ``loss`` passes it through. Every random
    draw of a training sample (noise level, noise, label dropout, routed token subset) comes from its own
    generator seeded ``mix(seed, step, id)``, where ``step`` is the optimizer step (set before each batch by
    :class:`TrainStep`) and ``id`` the sample's dataset id. Each rank thus
    draws for its own samples, and a step's draws do not depend on the world size, the micro-batch split
    or whether the run was resumed.

    Caption dropout (CFG) replaces a text condition by the network's ``null_label``, the empty prompt.

    Args:
        net: The DiT or MMDiT.
        objective: :class:`EDM` or :class:`RectifiedFlow`.
        seed: Base seed of the training randomness.
    """

    def __init__(self, net: DiT, objective: EDM | RectifiedFlow, seed: int = 0) -> None:
        super().__init__()
        self.net = net
        self.objective = objective
        self.seed = int(seed)
        self.step = 0
        self._flops_cache: dict[tuple, float] = {}  # train_flops_per_sample by (routes, latent size)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["latent"].float()
        ids = batch["id"]
        seeds = sample_seeds(self.seed, self.step, ids.tolist() if torch.is_tensor(ids) else ids)
        routing = [mix_seed(s, ROUTING_SALT) for s in seeds]

        def net(x_in: torch.Tensor, t: torch.Tensor, y: Any) -> torch.Tensor:
            return self.net(x_in, t, y, routing_seed=routing)

        return self.objective.training_loss(net, x, condition_of(batch, x.device), self.net.null_label,
                                            sample_seeds=seeds)

    def train_flops_per_sample(self, latent_hw: tuple[int, int] | None = None) -> float:
        """Model FLOPs of one training sample (forward + backward = 3× forward), with the routes in use now
        (their rates scaled by the routing schedule's current factor), at the latent ``(H, W)`` of the batch
        (an aspect-ratio bucket; ``None``: the configured size). Cached per routes and size.

        Activation-checkpointing recomputation is not counted (the usual MFU convention).
        """
        router = self.net.router
        routes = router.active_routes() if router is not None and router.enabled else []
        hw = None if latent_hw is None else (int(latent_hw[0]), int(latent_hw[1]))
        key = (tuple((r.rate, r.start, r.end) for r in routes), hw)
        if key not in self._flops_cache:
            self._flops_cache[key] = model_flops(self.net, routes, latent_hw=hw).train_routed
        return self._flops_cache[key]

    def flops_per_batch(self, batch: dict[str, Any]) -> float:
        """Training FLOPs of ``batch`` on this rank (the attribute Composer's ``SpeedMonitor`` reads)."""
        latent = batch["latent"]
        return latent.shape[0] * self.train_flops_per_sample(tuple(latent.shape[-2:]))

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {}


def condition_of(batch: dict[str, Any], device: torch.device) -> Any:
    """The network's condition for a batch: a :class:`TextCondition` (float32) when the batch carries text
    embeddings (an MMDiT dataset), else the ``(B,)`` labels."""
    if "text_emb" in batch:
        return TextCondition.from_batch(batch).to(device, torch.float32)
    return batch["label"]


class TrainStep(Callback):
    """Before each training batch, set ``model.step`` to the batch count (restored by Composer on resume).

    :class:`DiffusionModel` seeds every sample's draws with it.
    """

    def before_train_batch(self, state: State, logger: Logger) -> None:
        unwrap(state.model).step = int(state.timestamp.batch)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP-style ``.module`` wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def dit_of(model: nn.Module) -> nn.Module:
    """The routed block stack's owner inside a (possibly wrapped) ComposerModel: ``model.net`` or the model."""
    model = unwrap(model)
    return getattr(model, "net", model)


def build_model(cfg, device: str, meta=None) -> tuple[DiffusionModel, torch.optim.Optimizer]:
    """The run's :class:`DiffusionModel` (same initial weights on every rank and run) and its AdamW.

    Args:
        cfg: The validated :class:`~tread_scale.config.RunConfig`.
        device: Composer's device name; fused AdamW is used on GPU, and on CPU for plain (DDP) parameters,
            where it is 9x the default loop (B/2: 53 vs 487 ms a step); CPU FSDP2 (DTensor) and DeepSpeed
            parameters keep the default.
        meta: The dataset's facts; a text-conditioned model takes its empty prompt (read from ``data.remote``)
            as its null condition, the target of caption dropout.
    """
    from composer.utils import reproducibility

    from tread_scale.factory import build_net, build_objective
    from tread_scale.sampling import load_initial_weights

    reproducibility.seed_all(cfg.seed)  # identical initial weights on every rank and every run
    net = build_net(cfg.model)
    if cfg.model.init_from:
        load_initial_weights(net, cfg.model.init_from)
    if meta is not None and meta.text is not None and hasattr(net, "set_null_condition"):
        # after init_from: this run's captions are dropped to the empty prompt of its own data's encoders
        from tread_scale.data.metadata import read_empty_prompt

        empty = read_empty_prompt(cfg.data.remote, meta)
        net.set_null_condition(TextCondition.from_batch({k: v.unsqueeze(0) for k, v in empty.items()}))
    net.grad_checkpointing = cfg.parallelism.activation_checkpointing
    if cfg.train.compile:
        for block in net.blocks:
            block.compile(backend=cfg.train.compile_backend)
    model = DiffusionModel(net, build_objective(cfg.objective), seed=cfg.seed)
    opt = cfg.optimizer
    fused = opt.fused if opt.fused is not None else (device == "gpu" or cfg.parallelism.backend == "ddp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay, fused=fused)
    return model, optimizer
