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

import json
import logging
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
    """Write a ``DiTTransformer2DModel`` folder (config + safetensors) from exported EMA weights."""
    from diffusers import DiTTransformer2DModel

    state, meta = load_weights_and_meta(weights)
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


def import_facebook_dit(checkpoint: str | Path, out: str | Path, model_name: str, num_classes: int = 1000,
                        input_size: int = 32, in_channels: int = 4) -> Path:
    """Convert a facebookresearch/DiT checkpoint (a state dict, or a training checkpoint with ``ema``) to our
    safetensors format, as the starting point of a fine-tune (``model.init_from``).

    A ``learn_sigma`` variance head is dropped (only the mean prediction is kept). DiT was trained with
    DDPM timesteps, so fine-tune under our objective before sampling with it.

    Raises:
        CheckpointError: If the file is not a plain tensor checkpoint or does not fit ``model_name``.
    """
    from tread_scale.config import ModelConfig, RoutingConfig, to_dict
    from tread_scale.factory import build_dit

    p = Path(checkpoint)
    if not p.is_file():
        raise CheckpointError(f"DiT checkpoint {str(p)!r} not found")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that needs unpickling code lands here
        raise CheckpointError(f"{p}: not a plain tensor checkpoint ({type(e).__name__}); refusing to unpickle code") \
            from None
    state = obj.get("ema", obj.get("model", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: expected a state dict (or a dict with 'ema'/'model')")
    cfg = ModelConfig(name=model_name, num_classes=num_classes, input_size=input_size, in_channels=in_channels)
    net = build_dit(cfg)
    size, patch = cfg.size()
    w = state["final_layer.linear.weight"]
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
                       source=f"facebookresearch/DiT {p.name}", step=0, ema=True)
    return save_weights(out, net.state_dict(), meta)
