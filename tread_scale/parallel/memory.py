"""The dry-run's memory model: bytes per rank (device and host) of a training config.

It is deliberately explicit so that each term can be checked:

* parameters, gradients, AdamW moments (2 per parameter) and the EMA copy, each divided by the number of
  ranks that share it under the chosen backend (DDP: none; FSDP: the shard group; ZeRO-1: optimizer, fp32
  master weights and the EMA kept with them; ZeRO-2: also gradients; ZeRO-3: also parameters);
* working copies that sharded backends gather for compute (the largest FSDP unit, twice with prefetch,
  or every unit when parameters are not resharded after forward; DeepSpeed's stage-3 prefetch bucket);
* activations saved for backward at the micro-batch size: per block and token, ``ACT_FP32`` values of
  width D that stay in fp32 under autocast (LayerNorm inputs, modulated activations: the residual stream
  is fp32) and ``ACT_LOWP`` values in the compute dtype (q, k, v, attention output, linear inputs, the two
  4D MLP activations, …), counted on our block and checked against measured saved tensors in
  ``tests/parallel/test_plan.py``; plus the pre-route sequence each route keeps alive; with activation
  checkpointing only block inputs plus one block's activations. An MMDiT's text tokens pass every block
  (never routed) and count like image tokens; QK-norm adds ``ACT_QK_NORM`` fp32 values per token (the last
  block's key/value-only text stream is counted as a full one: high by under ``1/depth`` of the text part);
* backward transients above what the forward pass saved: ``ACT_GRAD`` fp32 values of width D per token of
  the widest block (the residual stream's incoming and outgoing gradients and one gradient inside the
  block, measured in ``tests/parallel/test_plan.py``), and under ZeRO-3 one block's full gradients before
  they are reduce-scattered (DDP's and ZeRO-1/2's gradients are counted as gradients, FSDP's with the
  gathered unit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tread_scale.config import RunConfig
from tread_scale.errors import ConfigError
from tread_scale.models.dit import DiT
from tread_scale.models.mmdit import MMDiT
from tread_scale.routing.flops import tokens_per_block
from tread_scale.routing.routes import resolve_routes

#: Values of width D saved for backward per token and block: kept in fp32 under autocast (2 LayerNorm
#: inputs, 2 modulated activations) and in the compute dtype (qkv input, q, k, v, attention output,
#: projection input and output, fc1 input, the 4D MLP activations before and after GELU, fc2 output).
ACT_FP32 = 4
ACT_LOWP = 17
#: With QK-norm (MMDiT): RMSNorm computes in fp32 and keeps each query's and key's fp32 input and normalised
#: product for backward, 4 more fp32 values of width D per token (measured in ``tests/parallel/test_plan.py``).
ACT_QK_NORM = 4
#: fp32 values of width D per token alive in backward on top of the saved activations (measured 2.4-2.6 for the
#: DiT without checkpointing; with checkpointing the recomputed block's activations come on top).
ACT_GRAD = 3
GiB = 1024**3


def _tokens(net: DiT | MMDiT, num_tokens: int | None) -> int:
    """Image tokens per sample: ``num_tokens``, or the configured size's ``net.num_tokens`` when ``None``."""
    return net.num_tokens if num_tokens is None else num_tokens


@dataclass
class Memory:
    """Estimated bytes per rank (device), and bytes per rank kept on the host (offload)."""

    terms: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    #: Host bytes the busiest rank needs to save a checkpoint, by term (:func:`save_host_memory`).
    checkpoint_host: dict[str, float] = field(default_factory=dict)
    #: Host bytes rank 0 needs to export the EMA weights (streamed; the other ranks keep nothing).
    export_host: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def training_state(self) -> float:
        return sum(v for k, v in self.terms.items() if k in ("params", "grads", "optimizer", "master", "ema"))


def activation_bytes(net: DiT | MMDiT, routes, microbatch: int, compute_bytes: int, checkpointing: bool,
                     include_recompute: bool = True, num_tokens: int | None = None) -> float:
    """Peak bytes of activations saved for backward by one micro-batch (``compute_bytes``: 2 bf16, 4 fp32).

    With ``checkpointing``, ``include_recompute=False`` gives only what the forward pass saves.
    ``num_tokens``: image tokens per sample (e.g. an aspect-ratio bucket's, ``net.tokens_for((h, w))``);
    ``None`` for the configured size's ``net.num_tokens``.
    """
    n, d, depth = _tokens(net, num_tokens), net.hidden_size, net.depth
    text = getattr(net, "text_len", 0)  # an MMDiT's text tokens go through every block (never routed)
    resolved = resolve_routes(routes, depth)
    tokens = [k + text for k in tokens_per_block(resolved, depth, n)]
    per_token = (ACT_FP32 + (ACT_QK_NORM if getattr(net, "qk_norm", False) else 0)) * 4 + ACT_LOWP * compute_bytes
    per_block = [per_token * k * d for k in tokens]
    if checkpointing:
        # forward keeps only block inputs (fp32 residual stream); backward recomputes one block at a time
        total = sum(4 * k * d for k in tokens) + (max(per_block) if include_recompute else 0)
    else:
        total = sum(per_block)
    total += 4 * len(resolved) * n * d  # the saved pre-route sequence of each route
    total += 4 * 4 * n * d  # embedding output, final LayerNorm input and modulation
    total += text * getattr(net, "text_dim", 0) * compute_bytes  # text encoder tokens (the text projection's input)
    return microbatch * total


def backward_transient_bytes(net: DiT | MMDiT, microbatch: int, checkpointing: bool = False,
                             compute_bytes: int = 2, num_tokens: int | None = None) -> float:
    """Bytes alive in backward besides the saved activations and the persistent gradients.

    ``ACT_GRAD`` fp32 activation gradients per token and width at the widest block (routing does not narrow
    the dense blocks), one parameter's fresh gradient before it is accumulated (the largest), and under
    activation checkpointing one more block's activations: the recomputed block's intermediates and the
    gradients flowing through them are alive together (measured in ``tests/parallel/test_choose.py``; the
    recomputed block itself is counted with the activations). ``num_tokens``: image tokens per sample, as in
    :func:`activation_bytes`.
    """
    tokens = _tokens(net, num_tokens) + getattr(net, "text_len", 0)
    total = microbatch * ACT_GRAD * 4 * tokens * net.hidden_size
    total += 4 * max(p.numel() for p in net.parameters())
    if checkpointing:
        total += (activation_bytes(net, [], microbatch, compute_bytes, True, num_tokens=num_tokens)
                  - activation_bytes(net, [], microbatch, compute_bytes, True, False, num_tokens))
    return total


def estimate_memory(cfg: RunConfig, net: DiT | MMDiT, world_size: int, microbatch: int, gpu: bool,
                    num_tokens: int | None = None) -> Memory:
    """Bytes per rank for ``cfg``'s backend (see the module docstring).

    ``cfg`` must be validated (``load_config``, ``config_from_dict``) or its parallelism section checked by
    ``validate_parallelism``, so that the backend's section is resolved. ``num_tokens``: image tokens per
    sample the activations are counted at (an aspect-ratio bucket's); ``None`` for ``net.num_tokens``.
    """
    p_count = sum(p.numel() for p in net.parameters() if p.requires_grad)
    precision = cfg.train.precision
    bf16 = precision == "amp_bf16" or (precision == "auto" and gpu)
    compute = 2 if bf16 else 4
    par = cfg.parallelism
    mem = Memory()
    act = activation_bytes(net, cfg.routes, microbatch, compute, par.activation_checkpointing, num_tokens=num_tokens)
    unit = max(sum(p.numel() for p in b.parameters()) for b in net.blocks)
    if par.backend == "ddp":
        mem.terms.update(params=4 * p_count, grads=4 * p_count, optimizer=8 * p_count, ema=4 * p_count,
                         ddp_buckets=4 * p_count)
    elif par.backend == "fsdp":
        fs = par.fsdp
        shard = world_size // fs.replicate
        mem.terms.update(params=4 * p_count / shard, grads=4 * p_count / shard, optimizer=8 * p_count / shard,
                         ema=4 * p_count / shard)
        if fs.reshard_after_forward:
            mem.terms["gathered_units"] = 2 * unit * (compute + 4)  # current + prefetched unit, params and grads
        else:
            mem.terms["gathered_units"] = p_count * compute + 2 * unit * 4
    else:
        ds = par.deepspeed
        w = world_size
        param_bytes = compute  # DeepSpeed keeps model weights in the training dtype
        params = param_bytes * p_count / (w if ds.zero_stage == 3 else 1)
        grad_bytes = 4 if par.grad_reduce_dtype == "fp32" else param_bytes  # accumulated in the reduce dtype
        grads = grad_bytes * p_count / (w if ds.zero_stage >= 2 else 1)
        master = 4 * p_count / w  # fp32 partition the optimizer steps on (a copy even in fp32)
        optimizer = 8 * p_count / w
        ema = 4 * p_count / w  # sharded like the fp32 master partition, every stage
        mem.terms.update(params=params, grads=grads, master=master, optimizer=optimizer, ema=ema)
        if ds.zero_stage == 3:
            # parameters stay gathered up to stage3_max_live_parameters (DeepSpeed releases one only past that or
            # when its next use is further than stage3_max_reuse_distance); the prefetch bucket comes on top
            mem.terms["live_params"] = min(p_count, max(ds.stage3_max_live_parameters, unit)) * param_bytes
            mem.terms["prefetch"] = min(ds.stage3_prefetch_bucket_size, p_count) * param_bytes
        mem.terms["buckets"] = min(ds.reduce_bucket_size, p_count) * 4
        if ds.offload_optimizer:
            mem.host["master"] = mem.terms.pop("master")
            mem.host["optimizer"] = mem.terms.pop("optimizer")
        if ds.offload_params:
            mem.host["params"] = mem.terms.pop("params")
    mem.terms["activations"] = act
    mem.terms["backward"] = backward_transient_bytes(net, microbatch, par.activation_checkpointing, compute, num_tokens)
    if par.backend == "deepspeed" and par.deepspeed.zero_stage == 3:
        mem.terms["backward"] += unit * (4 if par.grad_reduce_dtype == "fp32" else compute)  # a block's gradients
    mem.checkpoint_host, mem.export_host = save_host_memory(cfg, net, world_size, compute)
    return mem


def save_host_memory(cfg: RunConfig, net: DiT | MMDiT, world_size: int,
                     compute_bytes: int) -> tuple[dict[str, float], float]:
    """Host bytes to save a checkpoint (busiest rank, by term) and to export the EMA (rank 0).

    * DDP: every rank gathers the full EMA into Composer's state (4 bytes per parameter); rank 0's
      ``torch.save`` copies the model and Adam state to the host one tensor at a time.
    * FSDP2 ``full``: rank 0 holds the full model and Adam moments on the host (12 B/param); every rank the
      full EMA. FSDP2 ``sharded`` (DCP): host copies of the rank's shards (16 B/param / shard).
    * DeepSpeed: each rank writes its EMA fragments one tensor at a time (at most one parameter); the engine's
      ``torch.save`` copies one flat partition at a time (the fp32 master partition, 4 B/param / ranks; none
      with optimizer offload), and rank 0 under ZeRO-1/2 the module's flat weights (compute dtype).

    The EMA export gathers one tensor at a time onto rank 0, which writes it at once: about the largest tensor.
    """
    p = sum(x.numel() for x in net.parameters() if x.requires_grad)
    largest = 4 * max(x.numel() for x in net.state_dict().values())
    ema = 4 * p if cfg.ema.enabled else 0.0
    par = cfg.parallelism
    if par.backend == "ddp":
        terms = {"ema": ema, "model_and_optimizer": largest}
    elif par.backend == "fsdp" and par.fsdp.state_dict_type == "full":
        terms = {"ema": ema, "model_and_optimizer": 12 * p}
    elif par.backend == "fsdp":
        shard = world_size // par.fsdp.replicate
        terms = {"ema": ema / shard, "model_and_optimizer": 12 * p / shard}
    else:
        ds = par.deepspeed
        fragment = largest / world_size if ds.zero_stage == 3 else min(largest, 4 * p / world_size)
        optimizer = 0.0 if ds.offload_optimizer else 4 * p / world_size
        module = compute_bytes * p if ds.zero_stage < 3 else 0.0
        terms = {"ema": fragment if cfg.ema.enabled else 0.0, "engine": max(optimizer, module)}
    return terms, largest


def parse_bytes(text: str) -> float:
    """``80GB`` / ``80GiB`` / ``141gb`` → bytes (GB and GiB both read as 2^30, as GPU vendors quote)."""
    t = text.strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * GiB
    raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB")
