"""SD3 / SD3.5 weights in (``tread-scale import-sd3``) and MMDiT weights out as a diffusers
``SD3Transformer2DModel`` folder (``tread-scale export --format diffusers``).

The parameter maps are :mod:`tread_scale.models.sd3_layout`. Sources:

* a diffusers folder (``save_pretrained`` of ``SD3Transformer2DModel``: ``config.json`` and
  ``diffusion_pytorch_model[-0000N-of-0000M].safetensors``), or the ``transformer/`` folder of a pipeline;
* a single original-layout ``.safetensors`` (``joint_blocks.N.x_block…``, with or without the
  ``model.diffusion_model.`` prefix), converted to diffusers' names by diffusers' own
  ``convert_sd3_transformer_checkpoint_to_diffusers``; its config is read off the tensors (head width from
  the QK-norm scales, else SD3's 64; the position table's side) and ``--input-size`` (latent side, 128 for
  1024² images).

Imported weights record SD3's conventions: rectified flow with ``shift`` 3.0, ``timestep_scale`` 1000,
``pos_embed: sd3``, ``text_mask: false`` (SD3 attends to padded T5 tokens), 16 latent channels (from the
file). Their null condition (CFG's unconditional branch) is unset, and CFG sampling refuses them, until
``--empty-prompt DATASET`` stores a captioned dataset's encoded empty prompt with them or a fine-tune sets it
from its data.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from tread_scale.errors import CheckpointError
from tread_scale.models.sd3_layout import diffusers_config, from_diffusers, model_kwargs, to_diffusers
from tread_scale.weights import DataFacts, WeightsMeta, load_weights_and_meta, save_weights

log = logging.getLogger(__name__)

#: SD3's timestep shift at 1024² (its scheduler config); recorded with imported weights.
SD3_SHIFT = 3.0
_ORIGINAL_PREFIX = "model.diffusion_model."


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def read_diffusers_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, state)`` of an ``SD3Transformer2DModel`` folder (or a pipeline folder's ``transformer/``).

    Raises:
        CheckpointError: Naming the folder when it holds no SD3 transformer config or no safetensors weights.
    """
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected an SD3Transformer2DModel save_pretrained folder)")
    config = json.loads(cfg_file.read_text())
    if config.get("_class_name") not in (None, "SD3Transformer2DModel"):
        raise CheckpointError(f"{folder}: config.json describes a {config['_class_name']}, not an "
                              "SD3Transformer2DModel (Flux and other families are not imported)")
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no diffusion_pytorch_model*.safetensors (only safetensors are read; a .bin "
                              "pickle could run code)")
    return config, _read_safetensors(files)


def read_original_file(path: Path, input_size: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, diffusers state)`` of a single original-layout SD3/SD3.5 ``.safetensors`` file.

    Raises:
        CheckpointError: If the file holds no SD3 MMDiT (named), or an MMDiT-X.
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    raw = _read_safetensors([path])
    state = {k[len(_ORIGINAL_PREFIX):]: v for k, v in raw.items() if k.startswith(_ORIGINAL_PREFIX)} or raw
    if "x_embedder.proj.weight" not in state or not any(k.startswith("joint_blocks.") for k in state):
        raise CheckpointError(f"{path}: not an original-layout SD3 MMDiT (no x_embedder / joint_blocks tensors)")
    if any(".attn2." in k for k in state):
        raise CheckpointError(f"{path}: an MMDiT-X (SD3.5-Medium: dual attention) is not supported; import-sd3 takes "
                              "the plain MMDiT members, SD3-Medium and SD3.5-Large")
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    side = math.isqrt(state["pos_embed"].shape[1])
    ln_q = next((v for k, v in state.items() if k.endswith(".attn.ln_q.weight")), None)
    head_dim = int(ln_q.shape[0]) if ln_q is not None else 64  # SD3's heads are 64 wide (QK-norm shows it)
    if width % head_dim:
        raise CheckpointError(f"{path}: width {width} is not a multiple of SD3's 64-channel heads")
    config = {"sample_size": input_size, "patch_size": patch, "in_channels": in_channels,
              "num_layers": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("joint_blocks.")),
              "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
              "joint_attention_dim": state["context_embedder.weight"].shape[1], "caption_projection_dim": width,
              "pooled_projection_dim": state["y_embedder.mlp.0.weight"].shape[1],
              "out_channels": state["final_layer.linear.weight"].shape[0] // (patch * patch),
              "pos_embed_max_size": side, "dual_attention_layers": (),
              "qk_norm": "rms_norm" if any(".ln_q." in k for k in state) else None}
    return config, convert_sd3_transformer_checkpoint_to_diffusers(dict(state))


def import_sd3(src: str | Path, out: str | Path, input_size: int = 128, empty_prompt: str | None = None) -> Path:
    """Convert SD3 / SD3.5 transformer weights to our safetensors (for ``model.init_from`` and ``sample``).

    Args:
        src: A diffusers folder or an original-layout single ``.safetensors`` file.
        out: The ``.safetensors`` to write.
        input_size: Latent side for a single file (a diffusers config has its ``sample_size``).
        empty_prompt: A captioned dataset (local or ``s3://``) in the model's text layout whose encoded empty
            prompt becomes the null condition (so CFG sampling works before any fine-tune); ``None`` leaves it
            unset.

    Raises:
        CheckpointError: For an unsupported member (named), a missing tensor or a shape that does not fit.
        DatasetError: If ``empty_prompt`` has no text or its widths differ from the model's.
    """
    from tread_scale.models.mmdit import MMDiT

    p = Path(src)
    if p.is_dir():
        config, state = read_diffusers_folder(p)
    elif p.is_file() and p.suffix == ".safetensors":
        config, state = read_original_file(p, input_size)
    else:
        raise CheckpointError(f"{src}: expected a diffusers SD3Transformer2DModel folder or an original-layout "
                              ".safetensors file")
    kwargs = model_kwargs(config, str(src))
    ours = from_diffusers(state, kwargs["depth"], kwargs["qk_norm"], str(src))
    with torch.device("meta"):
        net = MMDiT(**kwargs)
    expected = net.state_dict()
    for name in ("null_emb", "null_mask", "null_pooled"):  # unset: see empty_prompt
        ours[name] = torch.zeros(expected[name].shape, dtype=expected[name].dtype)
    text_facts = None
    if empty_prompt is not None:
        text_facts = _null_from_dataset(ours, empty_prompt, kwargs["text_dim"], kwargs["pooled_dim"])
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in ours.items()
           if k in expected and v.shape != expected[k].shape and not k.startswith("null_")]  # (any text length)
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if bad or missing or unexpected:
        raise CheckpointError(f"{src}: the converted weights do not fit an MMDiT of {kwargs['depth']} blocks of width "
                              f"{kwargs['hidden_size']}: shapes {bad[:3]}, missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
    model = {"name": None, "family": "mmdit", "depth": kwargs["depth"], "hidden_size": kwargs["hidden_size"],
             "num_heads": kwargs["num_heads"], "patch_size": kwargs["patch_size"], "mlp_ratio": 4.0,
             "in_channels": kwargs["in_channels"], "input_size": kwargs["input_size"],
             "text_dim": kwargs["text_dim"], "pooled_dim": kwargs["pooled_dim"], "text_len": None,
             "pos_embed": "sd3", "pos_embed_max_size": kwargs["pos_embed_max_size"], "qk_norm": kwargs["qk_norm"],
             "timestep_scale": 1000.0, "text_mask": False}
    meta = WeightsMeta(model=model, routing={"routes": []}, objective={"kind": "rf", "shift": SD3_SHIFT},
                       data=DataFacts(latent_shape=[kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"]],
                                      num_classes=0, vae="sd3", text=text_facts),
                       source=f"SD3 import of {p.name}", step=0)
    log.info("SD3 MMDiT: %d blocks of width %d (%d heads), %s, patch %d, %d latent channels, position table %d^2",
             kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"],
             "RMS QK-norm" if kwargs["qk_norm"] else "no QK-norm", kwargs["patch_size"], kwargs["in_channels"],
             kwargs["pos_embed_max_size"])
    return save_weights(out, ours, meta)


def _null_from_dataset(state: dict[str, torch.Tensor], root: str, text_dim: int, pooled_dim: int) -> dict:
    """Put the encoded empty prompt of captioned dataset ``root`` into ``state`` as the null condition and
    return the dataset's text facts (recorded with the weights)."""
    import dataclasses

    from tread_scale.data.metadata import read_empty_prompt, read_metadata
    from tread_scale.errors import DatasetError

    meta = read_metadata(root)
    if meta.text is None:
        raise DatasetError(f"--empty-prompt {root}: the dataset has no captions, so no empty prompt")
    if (meta.text.emb_dim, meta.text.pooled_dim) != (text_dim, pooled_dim):
        raise DatasetError(f"--empty-prompt {root}: its text is {meta.text.emb_dim} wide with pooled width "
                           f"{meta.text.pooled_dim}, the model takes {text_dim} and {pooled_dim} (SD3's layout: "
                           "convert captions with --clip-l, --clip-g and --t5)")
    empty = read_empty_prompt(root, meta)
    state["null_emb"] = empty["text_emb"].float().unsqueeze(0)
    state["null_mask"] = empty["text_mask"].bool().unsqueeze(0)
    state["null_pooled"] = empty["text_pooled"].float().unsqueeze(0)
    log.info("null condition: the empty prompt of %s (%d tokens, %d valid)", root, meta.text.seq_len,
             int(state["null_mask"].sum()))
    return dataclasses.asdict(meta.text)


def export_sd3_diffusers(weights: str | Path, out_dir: str | Path) -> Path:
    """Write MMDiT weights as a diffusers ``SD3Transformer2DModel`` folder (``from_pretrained`` loads it).

    Raises:
        CheckpointError: For an MMDiT diffusers' SD3 cannot express (:func:`~tread_scale.models.sd3_layout.
            diffusers_config` names why).
    """
    from diffusers import SD3Transformer2DModel

    state, meta = load_weights_and_meta(weights)
    cfg = meta.model_config()
    size, patch = cfg.size()
    kwargs = {"input_size": cfg.input_size, "patch_size": patch, "in_channels": cfg.in_channels,
              "hidden_size": size.hidden_size, "depth": size.depth, "num_heads": size.num_heads,
              "mlp_ratio": size.mlp_ratio, "text_dim": cfg.text_dim, "pooled_dim": cfg.pooled_dim,
              "pos_embed": cfg.pos_embed or "rope", "pos_embed_max_size": cfg.pos_embed_max_size,
              "qk_norm": cfg.qk_norm,
              "timestep_scale": cfg.timestep_scale}
    config = diffusers_config(kwargs)
    if cfg.text_mask:
        log.warning("%s was trained with model.text_mask=true (padded text masked out); diffusers' SD3 attends to "
                    "every text token, so prompts with padding give other outputs there", weights)
    model = SD3Transformer2DModel(**config)
    theirs = to_diffusers(state, size.depth, cfg.qk_norm)
    try:
        model.load_state_dict(theirs, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: the mapped weights do not fit SD3Transformer2DModel({config}): "
                              f"{str(e).splitlines()[0]}") from None
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    # how to sample it (diffusers' SD3 pipeline: FlowMatchEulerDiscreteScheduler(shift=...)); routing is training-only
    (out / "tread_scale.json").write_text(json.dumps({"source": str(weights), "objective": meta.objective,
                                                      "training_routes": meta.routing}, indent=2))
    return out


__all__ = ["SD3_SHIFT", "export_sd3_diffusers", "import_sd3", "read_diffusers_folder", "read_original_file"]
