"""The one typed configuration schema of a tread_scale run, and its loader.

``load_config(path, overrides)`` reads a yaml file, applies ``key=value`` overrides and returns a
:class:`RunConfig`. Unknown keys are errors that name the key and the nearest valid one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from tread_scale.config_schema import apply_override, from_dict, parse_override, to_dict
from tread_scale.errors import ConfigError
from tread_scale.models.registry import DiTSize, parse_model_name
from tread_scale.routing.routes import Route, resolve_routes


@dataclass
class ModelConfig:
    """The DiT to train.

    ``name`` picks a registry entry (``DiT-XL/2``); leave it null and give ``depth``, ``hidden_size``,
    ``num_heads`` and ``patch_size`` for a custom size (tests, demos). ``init_from``: a ``.safetensors``
    file (ours, or converted by ``tread-scale import-dit``) to start from instead of a fresh init.
    """

    name: str | None = "DiT-B/2"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    in_channels: int = 4
    input_size: int = 32
    num_classes: int = 1000
    init: Literal["adaln_zero", "xavier_all"] = "adaln_zero"
    init_from: str | None = None

    def size(self) -> tuple[DiTSize, int]:
        """Resolve to ``(DiTSize, patch_size)``; explicit fields must agree with a named size."""
        explicit = {"depth": self.depth, "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                    "patch_size": self.patch_size}
        if self.name is None:
            missing = [k for k, v in explicit.items() if v is None]
            if missing:
                raise ConfigError(f"model.name is null, so model.{', model.'.join(missing)} must be set")
            return DiTSize(self.depth, self.hidden_size, self.num_heads, self.mlp_ratio), self.patch_size
        size, patch = parse_model_name(self.name)
        resolved = {"depth": size.depth, "hidden_size": size.hidden_size, "num_heads": size.num_heads,
                    "patch_size": patch}
        for k, v in explicit.items():
            if v is not None and v != resolved[k]:
                raise ConfigError(f"model.{k}={v} contradicts model.name={self.name} ({k}={resolved[k]}); "
                                  f"set model.name=null for a custom size")
        return DiTSize(size.depth, size.hidden_size, size.num_heads, self.mlp_ratio), patch


@dataclass
class RouteConfig:
    """One route: a fraction ``rate`` of tokens skips blocks ``start..end`` (inclusive; negative = from the end)."""

    rate: float
    start: int
    end: int


@dataclass
class RoutingConfig:
    """TREAD routing. No routes means a dense DiT.

    ``seed`` is the base of the routing stream (each rank mixes in its rank); null derives it from the run seed.
    """

    routes: list[RouteConfig] = field(default_factory=list)
    seed: int | None = None


@dataclass
class ObjectiveConfig:
    """Diffusion objective: ``edm`` (EDM preconditioning, Heun sampler) or ``rf`` (rectified flow, Euler)."""

    kind: Literal["edm", "rf"] = "edm"
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    label_dropout: float = 0.1


@dataclass
class OptimizerConfig:
    """AdamW (spec §4.2: lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping, no schedule)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None
    fused: bool | None = None


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, updated after every optimizer step."""

    enabled: bool = True
    decay: float = 0.9999


@dataclass
class DataConfig:
    """The training data: MDS shards of latents, streamed with mosaicml-streaming.

    ``remote`` is ``s3://bucket/prefix`` or a local folder. ``local`` is the cache root (default:
    ``<run_dir>/data_cache``); each node caches in its own ``node<N>`` folder below it, because streaming
    coordinates a cache only within a node. A local folder whose shards are all uncompressed is read in
    place; a compressed one is decompressed into that per-node cache, never into the dataset's folder.
    ``stall_timeout``: seconds a data wait (a shard, the next batch) may go without progress before the
    run fails naming the shard, its state, the rank and the node. The streaming ``batch_size`` is not a
    knob: it is always the per-rank batch (``train.global_batch_size / world_size``) so that ranks cannot
    disagree on it.
    """

    remote: str = ""
    local: str | None = None
    split: str | None = None
    shuffle: bool = True
    shuffle_algo: Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"] = "py1e"
    shuffle_seed: int = 9176
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None
    predownload: int | None = None
    cache_limit: str | None = None
    download_timeout: float = 60.0
    download_retry: int = 6
    stall_timeout: float = 300.0
    validate_hash: str | None = None
    num_workers: int = 2
    worker_start_method: Literal["fork", "spawn", "forkserver"] = "fork"
    pin_memory: bool = True
    prefetch_factor: int | None = 2
    persistent_workers: bool = True


@dataclass
class FSDPConfig:
    """FSDP2 (Composer's ``FSDP2Config``): parameters, gradients and optimizer state sharded over ranks.

    ``reshard_after_forward: true`` frees gathered parameters after each unit's forward (ZeRO-3 memory);
    ``false`` keeps them until backward (ZeRO-2-like: less communication, more memory). Wrap units are
    each DiT block, each embedder and the final layer. ``mixed_precision: default`` computes in the
    training precision with fp32 gradient reduction (bf16 params, fp32 reduce under ``amp_bf16``); ``pure``
    also reduces in low precision; ``full`` keeps everything fp32. ``replicate: R`` builds an HSDP mesh of
    R replicas × (world_size / R) shards (e.g. R = number of nodes).
    """

    reshard_after_forward: bool = True
    mixed_precision: Literal["default", "pure", "full"] = "default"
    state_dict_type: Literal["sharded", "full"] = "sharded"
    replicate: int = 1


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO, integrated by tread_scale (Composer 0.28+ has none).

    ``offload_optimizer`` keeps optimizer state (and its step) on the CPU; ``offload_params`` (stage 3 only)
    keeps parameters there too. Bucket sizes are in elements. Gradient clipping comes from
    ``optimizer.grad_clip_norm``; bf16 from ``train.precision``.
    """

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000


@dataclass
class ParallelismConfig:
    """How the model is replicated or sharded over ranks: ``ddp``, ``fsdp`` or ``deepspeed``.

    ``activation_checkpointing`` recomputes each DiT block in backward (any backend); the routed token
    subsets are drawn before the first block, so recomputation sees the same subsets. Only the section of
    the chosen backend may be given.
    """

    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    activation_checkpointing: bool = False
    fsdp: FSDPConfig | None = None
    deepspeed: DeepSpeedConfig | None = None


@dataclass
class TrainConfig:
    """Loop, precision, devices and checkpoints.

    ``preemption_flag``: a file whose appearance makes every rank checkpoint and stop (the Slurm scripts
    set it; SIGUSR1/SIGTERM to a training process do the same). ``preemption_grace``: seconds from such a
    signal to the start of the checkpoint; a rank stuck longer (or given a second SIGTERM) dumps its threads
    and exits non-zero. ``barrier_timeout``: bound of the barriers at the start and end of training, whose
    error names the ranks that did not arrive. ``nonfinite_loss``: on a NaN/Inf loss,
    ``stop`` with a clear error (the last checkpoint stays the last good one) or ``skip`` the batch's update
    (up to ``max_skipped_batches`` in a row; not with DeepSpeed). ``compile``: ``torch.compile`` each DiT
    block (with ``compile_backend``); routing gives a block at most two sequence lengths, so it compiles
    at most two graphs, and the gather/scatter between blocks stays eager.
    """

    max_duration: str = "400000ba"
    global_batch_size: int = 256
    device_microbatch_size: int | None = None
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"
    save_folder: str | None = None
    save_interval: str = "5000ba"
    save_num_checkpoints_to_keep: int = -1
    autoresume: bool = True
    deterministic: bool = False
    preemption_flag: str | None = None
    preemption_grace: float = 30.0
    barrier_timeout: float = 600.0
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_skipped_batches: int = 10
    compile: bool = False
    compile_backend: str = "inductor"


@dataclass
class SamplingConfig:
    """The in-training sample grid (EMA weights, fixed seeds).

    ``every: null`` samples only at the end of training (if ``at_fit_end``). ``vae`` is a local
    AutoencoderKL folder used to decode latents into images; pixel-space data needs none.
    """

    every: str | None = "5000ba"
    num_images: int = 16
    steps: int = 18
    cfg_scale: float = 1.0
    seed: int = 0
    at_fit_end: bool = True
    vae: str | None = None


@dataclass
class EvaluationConfig:
    """In-training evaluation (off unless an interval is set).

    FID-k: every ``fid_every``, ``fid_num_samples`` EMA samples with fixed seeds against ``reference``
    (ADM-style ``.npz``; ``tread-scale fid --save-ref`` makes one) using local Inception weights
    ``inception``. Validation loss: every ``val_every``, the loss of ``val_num_samples`` fixed samples
    with fixed noise at the noise levels ``val_levels`` (σ for EDM, t for rectified flow; default
    0.1, 0.5, 1, 2 and 0.1, 0.3, 0.5, 0.7, 0.9).
    """

    fid_every: str | None = None
    fid_num_samples: int = 5000
    fid_steps: int = 40
    fid_cfg_scale: float = 1.0
    fid_batch_size: int = 32
    inception: str | None = None
    reference: str | None = None
    val_every: str | None = None
    val_num_samples: int = 64
    val_levels: list[float] | None = None


@dataclass
class WandbConfig:
    """Weights & Biases logging. ``mode: offline`` needs no API key and no network."""

    enabled: bool = False
    project: str = "tread_scale"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class LoggingConfig:
    """Console, progress bar and loggers.

    ``metrics_interval``: batches between records of ``<run_dir>/metrics.jsonl`` (global mean loss,
    samples/s, wall-clock), the file that curves are drawn from. ``sample_ledger`` records the sample ids
    every rank consumed at every step in ``<run_dir>/ledger/`` (to audit resumption). ``peak_flops``: one
    device's peak FLOP/s for the MFU in ``metrics.jsonl`` (default: Composer's table of known GPUs).
    """

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress_bar: bool = True
    console_interval: str = "50ba"
    metrics_interval: int = 10
    sample_ledger: bool = False
    peak_flops: float | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    """A whole training run.

    Outputs go to ``<output_dir>/<run_name>/``: ``config.yaml``, ``checkpoints/`` (unless
    ``train.save_folder`` points elsewhere, e.g. ``s3://``), ``ema/`` (safetensors of the EMA weights) and
    ``samples/``. A stable ``run_name`` is what autoresume keys on.
    """

    run_name: str = "tread-run"
    output_dir: str = "runs"
    seed: int = 17
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def routes(self) -> list[Route]:
        return [Route(r.rate, r.start, r.end) for r in self.routing.routes]

    @property
    def routing_seed(self) -> int:
        return self.seed if self.routing.seed is None else self.routing.seed

    def checkpoint_folder(self) -> str:
        return self.train.save_folder or str(self.run_dir / "checkpoints")

    def data_cache(self, node: int = 0) -> str:
        """The data cache of node ``node``: its own folder below ``data.local`` (or the run folder)."""
        return str(Path(self.data.local or self.run_dir / "data_cache") / f"node{node}")


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that the per-field types cannot express.

    Raises:
        ConfigError: Naming the offending key.
    """
    size, patch = cfg.model.size()
    if cfg.model.input_size % patch:
        raise ConfigError(f"model.input_size={cfg.model.input_size} is not divisible by the patch size {patch}")
    if size.hidden_size % size.num_heads:
        raise ConfigError(f"model: hidden_size {size.hidden_size} is not divisible by num_heads {size.num_heads}")
    for key in ("in_channels", "input_size", "num_classes"):
        if getattr(cfg.model, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg.model, key)}")
    resolve_routes(cfg.routes, size.depth)
    if not cfg.data.remote:
        raise ConfigError("data.remote must be set (s3://bucket/prefix or a local folder of MDS shards)")
    for key, value in (("data.stall_timeout", cfg.data.stall_timeout),
                       ("train.preemption_grace", cfg.train.preemption_grace),
                       ("train.barrier_timeout", cfg.train.barrier_timeout)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be a positive number of seconds")
    if cfg.train.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be >= 1, got {cfg.train.global_batch_size}")
    mb = cfg.train.device_microbatch_size
    if mb is not None and mb < 1:
        raise ConfigError(f"train.device_microbatch_size must be >= 1, got {mb}")
    if not 0.0 <= cfg.objective.label_dropout < 1.0:
        raise ConfigError(f"objective.label_dropout must be in [0, 1), got {cfg.objective.label_dropout}")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in (0, 1), got {cfg.ema.decay}")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if "/" in cfg.run_name or not cfg.run_name.strip():
        raise ConfigError(f"run_name must be a non-empty name without '/', got {cfg.run_name!r}")
    if cfg.sampling.num_images < 1 or cfg.sampling.steps < 1:
        raise ConfigError("sampling.num_images and sampling.steps must be >= 1")
    validate_parallelism(cfg.parallelism)
    if cfg.train.nonfinite_loss == "skip" and cfg.parallelism.backend == "deepspeed":
        raise ConfigError("train.nonfinite_loss=skip is not supported with parallelism.backend=deepspeed "
                          "(the engine owns the optimizer step); use stop")
    ev = cfg.evaluation
    if ev.fid_every is not None:
        for key in ("inception", "reference"):
            value = getattr(ev, key)
            if not value:
                raise ConfigError(f"evaluation.fid_every is set, so evaluation.{key} must name a local file")
            if not Path(value).is_file():
                raise ConfigError(f"evaluation.{key}: {value!r} does not exist")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"model.init_from: {cfg.model.init_from!r} does not exist")
    return cfg


def validate_parallelism(p: ParallelismConfig, world_size: int | None = None) -> None:
    """Check the sharding plan (and, given a world size, its mesh).

    Raises:
        ConfigError: Naming the offending key.
    """
    for other in ("fsdp", "deepspeed"):
        if other != p.backend and getattr(p, other) is not None:
            raise ConfigError(f"parallelism.{other} is set but parallelism.backend is {p.backend!r}; "
                              f"remove the parallelism.{other} section or set parallelism.backend={other}")
    if p.backend == "deepspeed":
        ds = p.deepspeed or DeepSpeedConfig()
        if ds.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallelism.deepspeed.zero_stage must be 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_params and ds.zero_stage != 3:
            raise ConfigError(f"parallelism.deepspeed.offload_params needs zero_stage 3 (got {ds.zero_stage}): "
                              "only ZeRO-3 partitions parameters")
        for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
            if getattr(ds, key) < 1:
                raise ConfigError(f"parallelism.deepspeed.{key} must be >= 1, got {getattr(ds, key)}")
    if p.backend == "fsdp":
        fs = p.fsdp or FSDPConfig()
        if fs.replicate < 1:
            raise ConfigError(f"parallelism.fsdp.replicate must be >= 1, got {fs.replicate}")
        if world_size is not None and world_size % fs.replicate:
            raise ConfigError(f"parallelism.fsdp.replicate={fs.replicate} does not divide the world size "
                              f"{world_size}: the HSDP mesh needs replicate x shard = world size")


def config_from_dict(data: dict) -> RunConfig:
    """Strictly build and validate a :class:`RunConfig` from a plain mapping."""
    return validate(from_dict(RunConfig, data))


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.resolve() in chain:
        raise ConfigError(f"config file {str(p)!r}: 'base' files form a cycle")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid yaml: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(p)!r}: 'base' must be a path to another yaml file")
    return _deep_merge(_read_yaml(p.parent / base, (*chain, p.resolve())), data)


def load_config_dict(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a yaml file (merged over its ``base:`` file, if any) and apply ``key=value`` overrides.

    A ``base: other.yaml`` key (relative to the file) makes the file a set of changes to another one:
    mappings merge key by key, everything else (lists included) is replaced.

    Raises:
        ConfigError: If a file is missing or not a yaml mapping, or an override is malformed.
    """
    data = _read_yaml(Path(path))
    for text in overrides:
        path_, value = parse_override(text)
        apply_override(data, path_, value, text)
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load, override and validate a run config.

    Args:
        path: yaml file.
        overrides: ``key=value`` strings, e.g. ``routing.routes[0].rate=0.5``.

    Returns:
        The validated :class:`RunConfig`.

    Raises:
        ConfigError: Naming the file or key at fault.
    """
    return config_from_dict(load_config_dict(path, overrides))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as yaml."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
