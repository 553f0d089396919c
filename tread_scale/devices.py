"""Which device to run on: one resolution of ``auto`` / ``cpu`` / ``gpu`` / ``cuda[:N]`` for every entry point."""

from __future__ import annotations

import torch

from tread_scale.errors import ConfigError


def resolve_device(device: str = "auto", setting: str = "--device") -> torch.device:
    """The ``torch.device`` that a device setting names.

    ``auto`` picks CUDA when a CUDA device is visible and the CPU otherwise; ``gpu`` is a synonym of ``cuda``
    (Composer's name); anything else is passed to ``torch.device``.

    Args:
        device: ``auto``, ``cpu``, ``gpu``, ``cuda``, ``cuda:N`` or another ``torch.device`` string.
        setting: The option or config key the value came from, named in errors (e.g. ``train.device``).

    Returns:
        The device (``cuda`` without an index for ``auto`` and ``gpu``).

    Raises:
        ConfigError: If a CUDA device is asked for but none is visible, or the name is not a device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device("cuda" if device == "gpu" else device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{setting}={device!r} is not a device (auto, cpu, gpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={device} but no CUDA device is visible")
    return dev


def composer_device(device: torch.device) -> str:
    """Composer's name of a device: ``gpu`` for CUDA, otherwise the device type (``cpu``, ``mps``, ...)."""
    return "gpu" if device.type == "cuda" else device.type


__all__ = ["resolve_device", "composer_device"]
