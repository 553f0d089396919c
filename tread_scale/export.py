"""Moving weights in and out: diffusers' ``DiTTransformer2DModel`` layout, and facebookresearch/DiT checkpoints.

Routing is training-only, so a TREAD model exports as a plain DiT. What does not carry over:

* diffusers' DiT feeds the timestep through a sinusoid with ``downscale_freq_shift=1`` (frequencies
  ``exp(-ln(10000)·k/127)``) where DiT and tread_scale use ``k/128``; :func:`load_diffusers` sets the shift
  to 0 after loading, which makes the outputs equal. A plain ``from_pretrained`` differs slightly.
* the timestep *values* a model expects are its objective's (EDM: ``ln(σ)/4``; rectified flow: ``t`` in
  [0, 1]); diffusers' ``DiTPipeline`` feeds DDPM steps 0..999, so it cannot sample our models as is;
* diffusers' DiT supports square latents only.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from tread_scale.errors import CheckpointError
from tread_scale.weights import DataFacts, WeightsMeta, load_weights_and_meta, save_weights

log = logging.getLogger(__name__)


def _diffusers_config(meta: WeightsMeta) -> dict:
    cfg = meta.model_config()
    size, patch = cfg.size()
    if size.mlp_ratio != 4.0:
        raise CheckpointError("diffusers' DiT has a fixed MLP ratio of 4")
    return {"num_attention_heads": size.num_heads, "attention_head_dim": size.hidden_size // size.num_heads,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "num_layers": size.depth,
            "sample_size": cfg.input_size, "patch_size": patch, "num_embeds_ada_norm": cfg.num_classes,
            "norm_eps": 1e-6, "activation_fn": "gelu-approximate", "attention_bias": True,
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False}


def to_diffusers_state(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our (= facebookresearch/DiT) parameter names → ``DiTTransformer2DModel`` names."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"],
           "pos_embed.proj.bias": state["x_embedder.proj.bias"],
           "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": state["final_layer.linear.weight"],
           "proj_out_2.bias": state["final_layer.linear.bias"]}
    for i in range(depth):
        b, t = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = t + "norm1.emb."
        out[emb + "timestep_embedder.linear_1.weight"] = state["t_embedder.mlp.0.weight"]
        out[emb + "timestep_embedder.linear_1.bias"] = state["t_embedder.mlp.0.bias"]
        out[emb + "timestep_embedder.linear_2.weight"] = state["t_embedder.mlp.2.weight"]
        out[emb + "timestep_embedder.linear_2.bias"] = state["t_embedder.mlp.2.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        out[t + "norm1.linear.weight"] = state[b + "adaLN_modulation.1.weight"]
        out[t + "norm1.linear.bias"] = state[b + "adaLN_modulation.1.bias"]
        q, k, v = state[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = state[b + "attn.qkv.bias"].chunk(3)
        for name, w, bias in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):
            out[f"{t}attn1.{name}.weight"], out[f"{t}attn1.{name}.bias"] = w, bias
        out[t + "attn1.to_out.0.weight"] = state[b + "attn.proj.weight"]
        out[t + "attn1.to_out.0.bias"] = state[b + "attn.proj.bias"]
        out[t + "ff.net.0.proj.weight"] = state[b + "mlp.fc1.weight"]
        out[t + "ff.net.0.proj.bias"] = state[b + "mlp.fc1.bias"]
        out[t + "ff.net.2.weight"] = state[b + "mlp.fc2.weight"]
        out[t + "ff.net.2.bias"] = state[b + "mlp.fc2.bias"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_diffusers(weights: str | Path, out_dir: str | Path) -> Path:
    """Write a ``DiTTransformer2DModel`` folder (config + safetensors) from exported EMA weights.

    Raises:
        CheckpointError: If the weights are not a DiT's (an MMDiT has no counterpart in that layout).
    """
    from diffusers import DiTTransformer2DModel

    state, meta = load_weights_and_meta(weights)
    if meta.model_config().model_family() != "dit":
        raise CheckpointError(
            f"{weights} holds a text-to-image MMDiT, which DiTTransformer2DModel cannot hold; it exports as an "
            "SD3Transformer2DModel (tread_scale.sd3.export_sd3_diffusers; `tread-scale export` picks it)")
    config = _diffusers_config(meta)
    model = DiTTransformer2DModel(**config)
    mapped = to_diffusers_state(state, config["num_layers"])
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [m for m in missing if not m.endswith("pos_embed.pos_embed")]
    if missing or unexpected:
        raise CheckpointError(f"diffusers layout mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tread_scale.json").write_text(json.dumps({**meta.to_dict(), "note": __doc__.split("\n\n")[1]}, indent=2))
    log.info("exported %s to diffusers layout at %s", weights, out)
    return out


def load_diffusers(path: str | Path):
    """``DiTTransformer2DModel.from_pretrained`` with the DiT timestep frequencies (see the module docstring)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(path))
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model.eval()


#: What a facebookresearch/DiT training checkpoint holds besides tensors and plain containers: its
#: ``args`` (train.py saves ``{"model", "ema", "opt", "args"}``). Allowed for the duration of the load only.
DIT_CHECKPOINT_GLOBALS = (argparse.Namespace,)
#: Which weights of a training checkpoint can be imported.
DIT_WEIGHTS = ("ema", "model")


def read_dit_checkpoint(path: Path) -> object:
    """``torch.load(weights_only=True)`` of a facebookresearch/DiT file, also allowing the ``argparse.Namespace``
    of a training checkpoint's ``args`` (and nothing else).

    Raises:
        CheckpointError: If the file needs any other class (or code) to unpickle, naming it, or is unreadable.
    """
    try:
        with torch.serialization.safe_globals(list(DIT_CHECKPOINT_GLOBALS)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it holds {found.group(1)}, which" if found else "it holds something that"
        raise CheckpointError(f"{path}: not a plain tensor checkpoint: {what} only a full unpickle could build; "
                              "refusing to unpickle code (allowed: tensors, plain containers and the "
                              "argparse.Namespace 'args' of a facebookresearch/DiT training checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}); refusing to "
                              "unpickle code") from None


def dit_state_dict(obj: object, path: Path, weights: str = "ema", expect: dict | None = None) -> dict:
    """The state dict to import from what :func:`read_dit_checkpoint` returned.

    A training checkpoint (``{"model", "ema", "opt", "args"}``) gives its ``weights`` entry (EMA by default,
    as DiT's own ``sample.py``); a plain state dict (the released DiT checkpoints, which are EMA weights) is
    returned as it is. A training checkpoint's ``args`` are checked against ``expect`` (``model``,
    ``num_classes``, ``image_size``) where both have the value.

    Raises:
        CheckpointError: If ``weights`` is not one of :data:`DIT_WEIGHTS`, the checkpoint lacks it, ``model``
            was asked of a plain state dict, or the checkpoint's ``args`` disagree with ``expect``.
    """
    if weights not in DIT_WEIGHTS:
        raise CheckpointError(f"{path}: cannot import '{weights}' weights; choose one of {', '.join(DIT_WEIGHTS)}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict or a DiT training checkpoint (a dict with "
                              f"'ema'/'model'), found {type(obj).__name__}")
    if not any(k in obj for k in DIT_WEIGHTS):  # a plain state dict
        if weights != "ema":
            raise CheckpointError(f"{path} is a plain state dict (one set of weights; the released DiT checkpoints "
                                  f"are EMA weights), not a training checkpoint: '{weights}' applies to training "
                                  "checkpoints only")
        return obj
    if not isinstance(obj.get(weights), dict):
        raise CheckpointError(f"{path}: this training checkpoint has no '{weights}' state dict (its keys: "
                              f"{', '.join(map(str, obj))})")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        for key, want in (expect or {}).items():
            have = getattr(args, key, None)
            if have is not None and want is not None and have != want:
                raise CheckpointError(f"{path} was trained with {key}={have!r} (its args.{key}), not {want!r}")
    log.info("%s: importing the '%s' weights of a DiT training checkpoint", path, weights)
    return obj[weights]


def import_facebook_dit(checkpoint: str | Path, out: str | Path, model_name: str, num_classes: int = 1000,
                        input_size: int = 32, in_channels: int = 4, weights: str = "ema") -> Path:
    """Convert a facebookresearch/DiT checkpoint (a state dict, or a training checkpoint
    ``{"model", "ema", "opt", "args"}``) to our safetensors format, as the starting point of a fine-tune
    (``model.init_from``).

    Only tensors, plain containers and a training checkpoint's ``argparse.Namespace`` are unpickled. A
    ``learn_sigma`` variance head is dropped (only the mean prediction is kept). DiT was trained with DDPM
    timesteps, so fine-tune under our objective before sampling with it.

    Args:
        checkpoint: The DiT ``.pt`` file.
        out: The ``.safetensors`` to write.
        model_name: Registry name, e.g. ``DiT-XL/2``.
        num_classes: Classes of the checkpoint.
        input_size: Latent side (image size / 8).
        in_channels: Latent channels.
        weights: ``ema`` (default) or ``model``: which weights of a training checkpoint to import.

    Raises:
        CheckpointError: If the file needs code to unpickle, lacks the weights asked for, or does not fit
            ``model_name``.
    """
    from tread_scale.config import ModelConfig, RoutingConfig, to_dict
    from tread_scale.factory import build_dit

    p = Path(checkpoint)
    if not p.is_file():
        raise CheckpointError(f"DiT checkpoint {str(p)!r} not found")
    obj = read_dit_checkpoint(p)
    training = isinstance(obj, dict) and any(k in obj for k in DIT_WEIGHTS)
    state = dit_state_dict(obj, p, weights, {"model": model_name, "num_classes": num_classes,
                                              "image_size": input_size * 8})
    cfg = ModelConfig(name=model_name, num_classes=num_classes, input_size=input_size, in_channels=in_channels)
    net = build_dit(cfg)
    size, patch = cfg.size()
    w = state.get("final_layer.linear.weight")
    if not isinstance(w, torch.Tensor):
        raise CheckpointError(f"{p} does not fit {model_name}: no tensor 'final_layer.linear.weight' (not a DiT "
                              "state dict)")
    out_values = w.shape[0] // (patch * patch)
    if out_values == 2 * in_channels:  # learn_sigma: (p, p, 2C) rows; keep the first C (the mean)
        keep = torch.arange(patch * patch * 2 * in_channels).view(patch * patch, 2 * in_channels)[:, :in_channels]
        state = dict(state)
        state["final_layer.linear.weight"] = w[keep.flatten()]
        state["final_layer.linear.bias"] = state["final_layer.linear.bias"][keep.flatten()]
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{p} does not fit {model_name}: {str(e).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(f"{p} does not fit {model_name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta = WeightsMeta(model=to_dict(cfg), routing=to_dict(RoutingConfig()),
                       objective={"kind": "edm", "sigma_data": 0.5},
                       data=DataFacts(latent_shape=[in_channels, input_size, input_size], num_classes=num_classes,
                                      vae="sd-vae", scaling_factor=0.18215),
                       source=f"facebookresearch/DiT {p.name}" + (f" ({weights})" if training else ""),
                       step=0, ema=weights == "ema")
    return save_weights(out, net.state_dict(), meta)
