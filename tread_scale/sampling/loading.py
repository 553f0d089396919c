"""Networks and decoders for sampling: a DiT or MMDiT rebuilt from a weight file, initial weights, VAE decoders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from tread_scale.errors import CheckpointError
from tread_scale.weights import WeightsMeta, load_weights, load_weights_and_meta, resolve_weights

log = logging.getLogger(__name__)

Decoder = Callable[[torch.Tensor], torch.Tensor]


def _load_state(net: nn.Module, weights: dict[str, torch.Tensor], mismatch: str) -> None:
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{mismatch} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_net(path: str | os.PathLike, device: torch.device) -> tuple[nn.Module, WeightsMeta]:
    """Rebuild the DiT or MMDiT (with its routes) that a weight file records, and load its weights.

    An MMDiT's null condition (the empty prompt of its training data, for CFG) is part of the weights.

    Args:
        path: A ``.safetensors`` file written by training or ``import-dit``, or a run folder (its
            ``ema/latest.safetensors``).
        device: Where to put the network.

    Returns:
        ``(net, meta)``: the network in eval mode on ``device``, and the file's metadata.

    Raises:
        CheckpointError: If the file is missing, unsafe, lacks metadata, or its tensors do not fit the model.
    """
    from tread_scale.factory import build_net

    weights, meta = load_weights_and_meta(resolve_weights(path))
    net = build_net(meta.model_config(), meta.routing_config().routes)
    _load_state(net, weights, f"{path}: weights do not match the recorded model")
    return net.to(device).eval(), meta


def load_initial_weights(net: nn.Module, path: str | os.PathLike, setting: str = "model.init_from") -> None:
    """Load a weight file into an already built network (the start of a fine-tune).

    Args:
        net: The configured network.
        path: A ``.safetensors`` file written by training or ``import-dit``.
        setting: The config key that named the file, for errors.

    Raises:
        CheckpointError: If the file is missing, unsafe, or its tensors do not fit ``net``.
    """
    weights, meta = load_weights(path)
    recorded = float((meta.get("model") or {}).get("timestep_scale") or 1.0) if "model" in meta else None
    scale = getattr(getattr(net, "t_embedder", None), "scale", None)
    if recorded is not None and scale is not None and recorded != scale:
        raise CheckpointError(f"{setting}={path}: the weights were trained with model.timestep_scale={recorded:g} "
                              f"(weights without the key: 1) but this run feeds the timestep embedder t x {scale:g}; "
                              f"set model.timestep_scale={recorded:g} to continue them as they were trained")
    _load_state(net, weights, f"{setting}={path}: weights do not fit the configured model")
    log.info("initialised the model from %s (%s)", path, meta.get("source", meta.get("run_name", "")))


def make_decoder(vae: str | None, data_vae: str = "none", device: torch.device | str | None = None,
                 setting: str = "--vae") -> Decoder | None:
    """A latents → images function that decodes with the VAE at ``vae``, or ``None`` to keep latents as they are.

    The decoder follows the latents' device (the VAE moves there on first use) and returns images in
    [-1, 1] on that device. Without ``vae``, latents of a VAE (``data_vae`` other than ``none``) are shown as
    their raw channels, with a warning.

    Args:
        vae: A local ``AutoencoderKL`` folder (``save_pretrained`` layout), or ``None``.
        data_vae: The VAE the data was encoded with (``none`` for pixel space), as the weights or dataset record.
        device: Where to load the VAE first (default: the CPU).
        setting: The option or config key that names ``vae``, for the warning (e.g. ``sampling.vae``).

    Raises:
        ConfigError: If ``vae`` is not a loadable local VAE folder.
    """
    if vae:
        from tread_scale.data.conversion.vae import decode, load_vae

        model = load_vae(vae, device or "cpu")

        def _decode(latents: torch.Tensor) -> torch.Tensor:
            return decode(model.to(latents.device), latents).to(latents.device)

        return _decode
    if data_vae != "none":
        log.warning("the latents come from VAE %r but %s is not set: images show raw latent channels", data_vae,
                    setting)
    return None
