"""SD3's parameter layout (diffusers' ``SD3Transformer2DModel``) ↔ the MMDiT's, as pure state-dict maps.

The MMDiT is SD3's architecture; only names and packing differ:

* our fused ``qkv`` (rows ``[q; k; v]``) ↔ diffusers' ``to_q``/``to_k``/``to_v`` (image) and
  ``add_q_proj``/``add_k_proj``/``add_v_proj`` (text);
* adaLN-Zero modulation rows ``(shift, scale, gate, shift_mlp, scale_mlp, gate_mlp)`` are the same in both;
  the *continuous* adaLN of the final layer and of the last block's text stream is ``(shift, scale)`` here
  and ``(scale, shift)`` in diffusers (``AdaLayerNormContinuous``): the two halves are swapped;
* SD3's last block computes text queries (``add_q_proj``, ``norm_added_q``) whose output it discards. We
  have no such weights; an export writes **zeros** for ``add_q_proj`` and **ones** for ``norm_added_q`` (an
  identity scale), which leaves every output unchanged, and an import drops them;
* the position table ``pos_embed.pos_embed`` is our ``pos_embed`` of mode ``sd3`` (same centre crop);
* timesteps: diffusers' SD3 takes ``1000·t``; our model takes ``t`` with ``timestep_scale`` 1000.

A member the importer does not know is refused by name: SD3.5-Medium's MMDiT-X (``dual_attention_layers``:
a second, image-only attention in its first blocks) has no counterpart here.
"""

from __future__ import annotations

from typing import Any

import torch

from tread_scale.errors import CheckpointError

#: diffusers config keys whose values this layout supports as they are.
_KNOWN = {"sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
          "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
          "pos_embed_max_size", "dual_attention_layers", "qk_norm"}


def model_kwargs(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``MMDiT`` constructor arguments for a diffusers ``SD3Transformer2DModel`` config.

    Raises:
        CheckpointError: For a member this importer does not support (named), or an inconsistent config.
    """
    if config.get("dual_attention_layers"):
        raise CheckpointError(f"{where}: an MMDiT-X (SD3.5-Medium: dual attention in blocks "
                              f"{tuple(config['dual_attention_layers'])}) is not supported; import-sd3 takes the "
                              "plain MMDiT members, SD3-Medium and SD3.5-Large")
    qk = config.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise CheckpointError(f"{where}: qk_norm={qk!r} is not supported (SD3: none; SD3.5: 'rms_norm')")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    width = heads * head_dim
    if int(config.get("caption_projection_dim", width)) != width:
        raise CheckpointError(f"{where}: caption_projection_dim={config['caption_projection_dim']} differs from the "
                              f"width {width}; the joint blocks need them equal")
    unknown = sorted(set(config) - _KNOWN - {k for k in config if k.startswith("_")})
    if unknown:
        raise CheckpointError(f"{where}: config keys {unknown} are not known to this importer")
    return {"input_size": int(config["sample_size"]), "patch_size": int(config["patch_size"]),
            "in_channels": int(config["in_channels"]), "out_channels": int(config.get("out_channels") or
                                                                              config["in_channels"]),
            "hidden_size": width, "depth": int(config["num_layers"]), "num_heads": heads,
            "text_dim": int(config["joint_attention_dim"]), "pooled_dim": int(config["pooled_projection_dim"]),
            "pos_embed": "sd3", "pos_embed_max_size": int(config["pos_embed_max_size"]),
            "qk_norm": qk == "rms_norm", "timestep_scale": 1000.0, "text_mask": False}


def diffusers_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of MMDiT constructor arguments (inverse of :func:`model_kwargs`).

    Raises:
        CheckpointError: For a model diffusers' SD3 cannot express (non-square, positions other than ``sd3``,
            an MLP ratio other than 4, or an input other than ``1000·t``).
    """
    size = kwargs["input_size"]
    if not isinstance(size, int) and size[0] != size[1]:
        raise CheckpointError(f"diffusers' SD3 config has one sample_size; this model's latents are {size}")
    if kwargs.get("pos_embed") != "sd3":
        raise CheckpointError(f"model.pos_embed={kwargs.get('pos_embed')!r}: diffusers' SD3 adds its stored position "
                              "table (model.pos_embed=sd3, as imported SD3 weights use); RoPE, sincos or learned "
                              "positions have no counterpart there")
    if float(kwargs.get("mlp_ratio", 4.0)) != 4.0:
        raise CheckpointError("diffusers' SD3 has a fixed MLP ratio of 4")
    if float(kwargs.get("timestep_scale", 1.0)) != 1000.0:
        raise CheckpointError(f"model.timestep_scale={kwargs.get('timestep_scale')}: diffusers' SD3 feeds 1000·t")
    heads = int(kwargs["num_heads"])
    return {"sample_size": size if isinstance(size, int) else size[0], "patch_size": int(kwargs["patch_size"]),
            "in_channels": int(kwargs["in_channels"]),
            "out_channels": int(kwargs.get("out_channels") or kwargs["in_channels"]),
            "num_layers": int(kwargs["depth"]), "attention_head_dim": int(kwargs["hidden_size"]) // heads,
            "num_attention_heads": heads, "joint_attention_dim": int(kwargs["text_dim"]),
            "caption_projection_dim": int(kwargs["hidden_size"]), "pooled_projection_dim": int(kwargs["pooled_dim"]),
            "pos_embed_max_size": int(kwargs["pos_embed_max_size"]), "dual_attention_layers": (),
            "qk_norm": "rms_norm" if kwargs.get("qk_norm") else None}


_TOP = {  # ours -> diffusers, same tensors
    "x_embedder.proj.weight": "pos_embed.proj.weight", "x_embedder.proj.bias": "pos_embed.proj.bias",
    "pos_embed": "pos_embed.pos_embed",
    "t_embedder.mlp.0.weight": "time_text_embed.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_text_embed.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_text_embed.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_text_embed.timestep_embedder.linear_2.bias",
    "pooled_embedder.mlp.0.weight": "time_text_embed.text_embedder.linear_1.weight",
    "pooled_embedder.mlp.0.bias": "time_text_embed.text_embedder.linear_1.bias",
    "pooled_embedder.mlp.2.weight": "time_text_embed.text_embedder.linear_2.weight",
    "pooled_embedder.mlp.2.bias": "time_text_embed.text_embedder.linear_2.bias",
    "context_embedder.weight": "context_embedder.weight", "context_embedder.bias": "context_embedder.bias",
    "final_layer.linear.weight": "proj_out.weight", "final_layer.linear.bias": "proj_out.bias",
}
_STREAM = {  # per block: our stream -> diffusers prefix of (q, k, v), out, mlp, qk-norm names
    "img": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff", "attn.norm_q", "attn.norm_k", "norm1"),
    "txt": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context",
            "attn.norm_added_q", "attn.norm_added_k", "norm1_context"),
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers(state: dict[str, torch.Tensor], depth: int, qk_norm: bool) -> dict[str, torch.Tensor]:
    """Our MMDiT state dict (``pos_embed='sd3'``) → ``SD3Transformer2DModel``'s (see the module docstring)."""
    out = {d: state[o] for o, d in _TOP.items()}
    out["norm_out.linear.weight"] = _swap_halves(state["final_layer.adaLN_modulation.1.weight"])
    out["norm_out.linear.bias"] = _swap_halves(state["final_layer.adaLN_modulation.1.bias"])
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for stream, (q, k, v, proj, ff, nq, nk, norm) in _STREAM.items():
            s = f"{ours}{stream}."
            if f"{s}kv.weight" in state:  # the last block's text stream: keys and values only
                for suffix in ("weight", "bias"):
                    kk, vv = state[f"{s}kv.{suffix}"].chunk(2)
                    out[f"{theirs}{k}.{suffix}"], out[f"{theirs}{v}.{suffix}"] = kk, vv
                    out[f"{theirs}{q}.{suffix}"] = torch.zeros_like(kk)  # discarded by SD3: see the docstring
                    out[f"{theirs}{norm}.linear.{suffix}"] = _swap_halves(state[f"{s}adaLN_modulation.1.{suffix}"])
                if qk_norm:
                    out[f"{theirs}{nk}.weight"] = state[f"{s}k_norm.weight"]
                    out[f"{theirs}{nq}.weight"] = torch.ones_like(state[f"{s}k_norm.weight"])
                continue
            for suffix in ("weight", "bias"):
                qq, kk, vv = state[f"{s}qkv.{suffix}"].chunk(3)
                out[f"{theirs}{q}.{suffix}"], out[f"{theirs}{k}.{suffix}"], out[f"{theirs}{v}.{suffix}"] = qq, kk, vv
                out[f"{theirs}{proj}.{suffix}"] = state[f"{s}proj.{suffix}"]
                out[f"{theirs}{ff}.net.0.proj.{suffix}"] = state[f"{s}mlp.fc1.{suffix}"]
                out[f"{theirs}{ff}.net.2.{suffix}"] = state[f"{s}mlp.fc2.{suffix}"]
                out[f"{theirs}{norm}.linear.{suffix}"] = state[f"{s}adaLN_modulation.1.{suffix}"]
            if qk_norm:
                out[f"{theirs}{nq}.weight"] = state[f"{s}q_norm.weight"]
                out[f"{theirs}{nk}.weight"] = state[f"{s}k_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers(state: dict[str, torch.Tensor], depth: int, qk_norm: bool, where: str
                   ) -> dict[str, torch.Tensor]:
    """``SD3Transformer2DModel``'s state dict → ours (inverse of :func:`to_diffusers`; the last block's text
    query weights are dropped).

    Raises:
        CheckpointError: Naming a tensor the layout needs that the file lacks.
    """
    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{where}: no tensor {key!r}; is it an SD3Transformer2DModel of {depth} blocks?")
        return state[key]

    out = {o: get(d) for o, d in _TOP.items()}
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(get("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(get("norm_out.linear.bias"))
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for stream, (q, k, v, proj, ff, nq, nk, norm) in _STREAM.items():
            s = f"{ours}{stream}."
            last_text = stream == "txt" and f"{theirs}{proj}.weight" not in state
            for suffix in ("weight", "bias"):
                if last_text:
                    out[f"{s}kv.{suffix}"] = torch.cat([get(f"{theirs}{k}.{suffix}"), get(f"{theirs}{v}.{suffix}")])
                    out[f"{s}adaLN_modulation.1.{suffix}"] = _swap_halves(get(f"{theirs}{norm}.linear.{suffix}"))
                    continue
                out[f"{s}qkv.{suffix}"] = torch.cat([get(f"{theirs}{x}.{suffix}") for x in (q, k, v)])
                out[f"{s}proj.{suffix}"] = get(f"{theirs}{proj}.{suffix}")
                out[f"{s}mlp.fc1.{suffix}"] = get(f"{theirs}{ff}.net.0.proj.{suffix}")
                out[f"{s}mlp.fc2.{suffix}"] = get(f"{theirs}{ff}.net.2.{suffix}")
                out[f"{s}adaLN_modulation.1.{suffix}"] = get(f"{theirs}{norm}.linear.{suffix}")
            if qk_norm:
                out[f"{s}k_norm.weight"] = get(f"{theirs}{nk}.weight")
                if not last_text:
                    out[f"{s}q_norm.weight"] = get(f"{theirs}{nq}.weight")
    return {k: v.contiguous() for k, v in out.items()}


__all__ = ["diffusers_config", "from_diffusers", "model_kwargs", "to_diffusers"]
