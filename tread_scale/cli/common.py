"""What several commands share: a parser that takes options and positionals in any order, guidance options."""

from __future__ import annotations

import argparse
from typing import Any


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose subcommand parsers may take options and positionals in any order.

    A parser made with ``intermixed=True`` parses with :meth:`~argparse.ArgumentParser.parse_known_intermixed_args`,
    also when it runs as a subcommand, so ``dry-run cfg.yaml --world-size 8 a=1 b=2`` reads ``a=1 b=2`` as
    overrides wherever the options stand. (Plain argparse fills ``nargs="*"`` positionals from the first run
    of positionals only and rejects the rest as unrecognized.) Intermixing needs a parser without nested
    subcommands, so it is opt-in.

    Args:
        intermixed: Parse options and positionals in any order.
        *args: As for ``ArgumentParser``.
        **kwargs: As for ``ArgumentParser``.
    """

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._in_intermixed = False

    def parse_known_args(self, args=None, namespace=None):
        """As ``ArgumentParser.parse_known_args``, intermixed when the parser was made so."""
        if not self.intermixed or self._in_intermixed:
            return super().parse_known_args(args, namespace)
        self._in_intermixed = True  # parse_known_intermixed_args calls parse_known_args itself (twice)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._in_intermixed = False


def add_overrides(p: argparse.ArgumentParser) -> None:
    """The ``config`` yaml and its ``key=value`` overrides (anywhere among the options)."""
    p.add_argument("config", help="yaml file (see yamls/)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="key=value, e.g. routing.routes[0].rate=0.5 (before or after the options)")


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    """``--t5``, ``--clip``, ``--clip-l``, ``--clip-g``: local text encoder folders for prompts (default: those
    recorded with the weights)."""
    p.add_argument("--t5", metavar="DIR", help="local T5 encoder folder (default: the one recorded with the weights)")
    p.add_argument("--clip", metavar="DIR",
                   help="local CLIP encoder folder (default: the one recorded with the weights)")
    p.add_argument("--clip-l", metavar="DIR", help="local CLIP-L folder, SD3's text layout (default: as recorded)")
    p.add_argument("--clip-g", metavar="DIR", help="local CLIP-G folder, SD3's text layout (default: as recorded)")


def encoders_from_args(args: argparse.Namespace) -> dict[str, str | None]:
    """The encoder folders given by :func:`add_encoder_args`' flags."""
    return {"t5": args.t5, "clip": args.clip, "clip_l": args.clip_l, "clip_g": args.clip_g}


def add_guidance_args(p: argparse.ArgumentParser) -> None:
    """Sampler steps, CFG / TREAD guidance, VAE, batch size and device (``sample`` and ``fid``)."""
    p.add_argument("--steps", type=int, help="sampler steps (default: 40 for EDM-Heun, 50 for RF-Euler)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--tread-scale", type=float, help="TREAD guidance scale (off when not given)")
    p.add_argument("--strong-rate", type=float, default=0.3, help="routing rate of the strong branch")
    p.add_argument("--weak-rate", type=float, default=0.7, help="routing rate of the weak branch")
    p.add_argument("--tread-drop-label", action="store_true", help="null label in TREAD branches (reference bug)")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LOW", "HIGH"), help="guide only within this σ/t range")
    p.add_argument("--vae", help="local AutoencoderKL folder to decode latents")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per forward pass (keep it fixed to compare runs)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, gpu, cuda or cuda:N")


def guidance_from_args(args: argparse.Namespace):
    """The :class:`~tread_scale.diffusion.guidance.Guidance` that :func:`add_guidance_args` options describe."""
    from tread_scale.diffusion.guidance import Guidance

    return Guidance(cfg_scale=args.cfg_scale, tread_scale=args.tread_scale, strong_rate=args.strong_rate,
                    weak_rate=args.weak_rate, tread_drop_label=args.tread_drop_label,
                    interval=tuple(args.interval) if args.interval else None)


_SWEEP_KEYS = {"cfg": "cfg_scale", "tread": "tread_scale", "strong": "strong_rate", "weak": "weak_rate",
               "interval": "interval", "drop_label": "tread_drop_label"}


def parse_guidance_spec(spec: str, base):
    """One guidance setting of a sweep, e.g. ``cfg=1.5,tread=1.3,strong=0.3,weak=0.7,interval=0.1:0.9``: the
    keys given replace those of ``base`` (the command's own guidance options).

    Raises:
        ConfigError: Naming the spec and the key or value at fault.
    """
    import dataclasses

    from tread_scale.errors import ConfigError

    changes: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in _SWEEP_KEYS:
            raise ConfigError(f"--sweep {spec!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(_SWEEP_KEYS)}")
        try:
            if key == "interval":
                lo, sep, hi = value.partition(":")
                if not sep:
                    raise ValueError("give LOW:HIGH")
                changes["interval"] = (float(lo), float(hi))
            elif key == "drop_label":
                changes["tread_drop_label"] = value.lower() in ("1", "true", "yes")
            elif key == "tread" and value.lower() == "none":
                changes["tread_scale"] = None
            else:
                changes[_SWEEP_KEYS[key]] = float(value)
        except ValueError as e:
            raise ConfigError(f"--sweep {spec!r}: {key}={value!r} is not valid ({e})") from None
    guidance = dataclasses.replace(base, **changes)
    guidance.validate()
    return guidance
