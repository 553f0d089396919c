"""The typed schema of a tread_scale run: one dataclass per yaml section, :class:`RunConfig` at the top.

Each field's type and default is the contract the loader (:mod:`tread_scale.config.loader`) enforces key by
key; cross-field rules live in :mod:`tread_scale.config.validate`. A route is the model code's own
:class:`~tread_scale.routing.routes.Route`, so there is no separate route config type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tread_scale.errors import ConfigError
from tread_scale.models.registry import DiTSize, model_spec
from tread_scale.routing.routes import Route
from tread_scale.routing.schedule import RouteSchedule


@dataclass
class ModelConfig:
    """The network to train: a class-conditional DiT or a text-conditioned MMDiT.

    ``name`` picks a registry entry (``DiT-XL/2``, ``MMDiT-2B/2``); leave it null and give ``family``,
    ``depth``, ``hidden_size``, ``num_heads`` and ``patch_size`` for a custom size (tests, demos).
    ``init_from``: a ``.safetensors`` file (ours, or converted by ``tread-scale import-dit``) to start from
    instead of a fresh init.

    MMDiT only: ``text_dim``, ``pooled_dim`` and ``text_len`` (per-token and pooled text-embedding widths, padded
    text length) default to the training dataset's (its metadata records them; ``dry-run`` without data uses
    T5-XXL's 4096, CLIP-L+G's 2048 and 256); ``pos_embed`` (``rope`` by default; ``sd3``: SD3's stored table of
    ``pos_embed_max_size``² positions, centre-cropped to the latent grid, as imported SD3 weights use; the
    DiT always uses ``sincos``) and ``qk_norm``. ``num_classes`` does not apply to an MMDiT. ``text_mask``: mask padded text
    tokens out of the joint attention (true, exact for any padding) or attend to them as SD3 and Flux do
    (false: no mask, so attention may take the flash kernel).

    ``timestep_scale``: multiplier of the noise level before the timestep embedding's sinusoid; null picks
    1000 under rectified flow (SD3, Flux: the sinusoid's frequencies are built for that range) and 1 under
    EDM (``c_noise = ln σ / 4``). Weights record the value; weights written before it existed used 1 and
    still load with 1.
    """

    name: str | None = "DiT-B/2"
    family: Literal["dit", "mmdit"] | None = None
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
    text_dim: int | None = None
    pooled_dim: int | None = None
    text_len: int | None = None
    pos_embed: Literal["sincos", "learned", "rope", "sd3"] | None = None
    pos_embed_max_size: int | None = None
    qk_norm: bool = True
    timestep_scale: float | None = None
    text_mask: bool = True

    def model_family(self) -> str:
        """``dit`` or ``mmdit``: from ``name`` when set (``family``, if also set, must agree), else ``family``.

        Raises:
            ConfigError: If ``family`` contradicts the named model.
        """
        if self.name is None:
            return self.family or "dit"
        family = model_spec(self.name).family
        if self.family is not None and self.family != family:
            raise ConfigError(f"model.family={self.family} contradicts model.name={self.name} (a {family} model)")
        return family

    def size(self) -> tuple[DiTSize, int]:
        """Resolve to ``(DiTSize, patch_size)``; explicit fields must agree with a named size.

        Returns:
            The model size and its patch size.

        Raises:
            ConfigError: If ``name`` is null and a size field is missing, or a field contradicts ``name``.
        """
        explicit = {"depth": self.depth, "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                    "patch_size": self.patch_size}
        if self.name is None:
            missing = [k for k, v in explicit.items() if v is None]
            if missing:
                raise ConfigError(f"model.name is null, so model.{', model.'.join(missing)} must be set")
            return DiTSize(self.depth, self.hidden_size, self.num_heads, self.mlp_ratio), self.patch_size
        spec = model_spec(self.name)
        size, patch = spec.size, spec.patch_size
        resolved = {"depth": size.depth, "hidden_size": size.hidden_size, "num_heads": size.num_heads,
                    "patch_size": patch}
        for k, v in explicit.items():
            if v is not None and v != resolved[k]:
                raise ConfigError(f"model.{k}={v} contradicts model.name={self.name} ({k}={resolved[k]}); "
                                  f"set model.name=null for a custom size")
        return DiTSize(size.depth, size.hidden_size, size.num_heads, self.mlp_ratio), patch


@dataclass
class RoutingConfig:
    """TREAD routing. No routes means a dense DiT.

    Each entry of ``routes`` is a :class:`~tread_scale.routing.routes.Route` ``{rate, start, end}``: a
    fraction ``rate`` of tokens skips blocks ``start..end`` (inclusive; negative = from the end). ``seed`` is
    the base of the routing stream (each rank mixes in its rank); null derives it from the run seed.

    ``schedule`` (a :class:`~tread_scale.routing.schedule.RouteSchedule`, in batches) scales every route's
    rate over the run: ``dense_until`` dense batches first, then a ``ramp_batches`` rise from 0 to the full
    rates in ``ramp_levels`` steps, and a final dense phase from batch ``dense_from``. The default is the
    full rates throughout. Resume is exact in every stage (the factor is a function of the batch index).
    """

    routes: list[Route] = field(default_factory=list)
    seed: int | None = None
    schedule: RouteSchedule = field(default_factory=RouteSchedule)


@dataclass
class ObjectiveConfig:
    """Diffusion objective: ``edm`` (EDM preconditioning, Heun sampler) or ``rf`` (rectified flow, Euler).

    ``shift`` (rectified flow only): SD3's resolution-dependent timestep shift (SD3 paper §5.3.2, eq. 23),
    ``t' = a·t / (1 + (a − 1)·t)`` with ``a = shift``, applied to the training times and to the sampler's
    time grid alike; more image tokens keep more signal at a given noise level, so larger images want a
    larger ``a`` (SD3 uses 3.0 at 1024²). 1.0 is no shift. Weights record it and sampling uses it.
    """

    kind: Literal["edm", "rf"] = "edm"
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    t_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    label_dropout: float = 0.1
    shift: float = 1.0


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
    each DiT block, each embedder and the final layer. ``mixed_precision: default`` gathers the parameters
    for compute in the training precision (bf16 under ``amp_bf16``; the sharded master weights stay fp32);
    ``full`` gathers them in fp32 (autocast still computes matmuls in bf16). Gradients are reduced in
    ``parallelism.grad_reduce_dtype`` (``pure``, which used to mean bf16 reduction, is refused with that
    hint). ``replicate: R`` builds an HSDP mesh of R replicas × (world_size / R) shards (e.g. R = nodes).
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
    ``optimizer.grad_clip_norm``; bf16 from ``train.precision``. Stage 3 keeps gathered parameters alive
    up to ``stage3_max_live_parameters`` elements (and drops one sooner only when its next use is further
    than ``stage3_max_reuse_distance`` elements away); both are DeepSpeed's defaults, written explicitly into
    the engine config, and ``dry-run`` counts them.
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
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000


@dataclass
class ParallelismConfig:
    """How the model is replicated or sharded over ranks: ``ddp``, ``fsdp`` or ``deepspeed``.

    ``activation_checkpointing`` recomputes each DiT block in backward (any backend); the routed token
    subsets are drawn before the first block, so recomputation sees the same subsets. Only the section of
    the chosen backend may be given; validation (:func:`~tread_scale.config.validate.resolve_backend_sections`)
    fills it with its defaults when it is left out, so after validation ``fsdp`` is an :class:`FSDPConfig`
    when ``backend`` is ``fsdp`` and ``deepspeed`` a :class:`DeepSpeedConfig` when it is ``deepspeed``.

    ``grad_reduce_dtype`` is the dtype gradients are reduced (and, under DeepSpeed, accumulated) in under
    ``amp_bf16``, the same on every backend: ``fp32`` (default: every backend then trains the same model as
    DDP, see docs/cluster.md#dtypes-per-backend) or ``bf16`` (half the gradient traffic; DDP through
    PyTorch's ``bf16_compress_hook``, FSDP2 through its reduce dtype, DeepSpeed through
    ``communication_data_type``). Under fp32 training only ``fp32`` is accepted.
    """

    backend: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    activation_checkpointing: bool = False
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    fsdp: FSDPConfig | None = None
    deepspeed: DeepSpeedConfig | None = None


@dataclass
class TrainConfig:
    """Loop, precision, devices and checkpoints.

    ``preemption_flag``: a file whose appearance makes every rank checkpoint and stop (the Slurm scripts
    set it; SIGUSR1/SIGTERM to a training process do the same). ``preemption_grace``: seconds from such a
    signal to the start of the checkpoint; a rank stuck longer (or given a second SIGTERM) dumps its threads
    and exits non-zero; after the checkpoint, the process has as long again to be gone.
    ``barrier_timeout``: bound of the barriers at the start and end of training, whose error names the
    ranks that did not arrive. ``collective_timeout``: the process group's timeout, which bounds every
    other collective (gradient all-reduce, EMA and export gathers, sample grid and evaluation across
    ranks, the preemption agreement): under gloo the collective raises, under NCCL PyTorch's watchdog
    aborts the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default). ``nonfinite_loss``: on a NaN/Inf loss,
    ``stop`` with a clear error (the last checkpoint stays the last good one) or ``skip`` the batch's update
    (up to ``max_skipped_batches`` in a row; not with DeepSpeed). ``compile``: ``torch.compile`` each DiT
    block (with ``compile_backend``); routing gives a block at most two sequence lengths, so it compiles
    at most two graphs (a ``routing.schedule`` ramp adds one per step, ``ramp_levels``), and the
    gather/scatter between blocks stays eager. With aspect-ratio buckets the first change of token count makes
    dynamo treat the sequence length as dynamic, so the count stays at two per block kind whatever the number
    of buckets (``tests/models/test_compile_buckets.py``: six buckets with routing, 2 graphs for the DiT, 4 for
    the MMDiT, whose last block differs).
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
    collective_timeout: float = 600.0
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_skipped_batches: int = 10
    compile: bool = False
    compile_backend: str = "inductor"


@dataclass
class SamplingConfig:
    """The in-training sample grid (EMA weights, fixed seeds).

    ``every: null`` samples only at the end of training (if ``at_fit_end``). ``vae`` is a local
    AutoencoderKL folder used to decode latents into images; pixel-space data needs none. Text-conditioned
    runs sample ``prompts`` (encoded with the ``text`` section's encoders), or else the captions of the
    dataset's first ``num_images`` samples (their stored embeddings: no encoder needed).
    """

    every: str | None = "5000ba"
    num_images: int = 16
    steps: int = 18
    cfg_scale: float = 1.0
    seed: int = 0
    at_fit_end: bool = True
    vae: str | None = None
    prompts: list[str] | None = None


@dataclass
class TextConfig:
    """Local text-encoder folders of a text-conditioned run (``save_pretrained`` layout; nothing is downloaded).

    When set, training checks them at start against the encoders the dataset was converted with (kinds and
    content hashes) and can encode ``sampling.prompts``; their paths are recorded with the weights, so
    ``tread-scale sample --prompt`` finds them by default. ``clip_l`` and ``clip_g`` (with ``t5``) are for
    datasets in SD3's text layout (``tread-scale convert captions --clip-l --clip-g --t5``).
    """

    t5: str | None = None
    clip: str | None = None
    clip_l: str | None = None
    clip_g: str | None = None

    def folders(self) -> dict[str, str | None]:
        """The folders by encoder kind."""
        return {"t5": self.t5, "clip": self.clip, "clip_l": self.clip_l, "clip_g": self.clip_g}


@dataclass
class EvaluationConfig:
    """In-training evaluation (off unless an interval is set).

    FID-k: every ``fid_every``, ``fid_num_samples`` EMA samples with fixed seeds against ``reference``
    (ADM-style ``.npz``; ``tread-scale fid --save-ref`` makes one) using local Inception weights
    ``inception``; a text-to-image MMDiT generates one image per caption of the validation data's first
    ``fid_num_samples`` samples (``val_data`` or the training data), and with ``clip`` (a local CLIP folder)
    its CLIP score is logged next to FID. Validation loss (:mod:`tread_scale.evaluation.val_loss`): every ``val_every``, the loss
    of the first ``val_num_samples`` samples of ``val_data`` (a held-out dataset of the same shapes; default:
    the training data) with fixed noise per sample at the noise levels ``val_levels`` (t for rectified flow,
    default 8 equidistant (k + 1/2)/8; σ for EDM, default 0.1, 0.5, 1, 2), bitwise the same for any world
    size.
    """

    fid_every: str | None = None
    fid_num_samples: int = 5000
    fid_steps: int = 40
    fid_cfg_scale: float = 1.0
    fid_batch_size: int = 32
    inception: str | None = None
    reference: str | None = None
    clip: str | None = None
    val_every: str | None = None
    val_num_samples: int = 64
    val_levels: list[float] | None = None
    val_data: str | None = None
    val_split: str | None = None


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
    text: TextConfig = field(default_factory=TextConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<run_name>``: where the run's outputs go."""
        return Path(self.output_dir) / self.run_name

    @property
    def routes(self) -> list[Route]:
        """The routes of ``routing.routes`` (a new list; the routes themselves are immutable)."""
        return list(self.routing.routes)

    @property
    def routing_seed(self) -> int:
        """The base seed of the routing stream: ``routing.seed``, or the run seed when that is null."""
        return self.seed if self.routing.seed is None else self.routing.seed

    def checkpoint_folder(self) -> str:
        """Where checkpoints go: ``train.save_folder``, or ``<run_dir>/checkpoints``."""
        return self.train.save_folder or str(self.run_dir / "checkpoints")

    def data_cache(self, node: int = 0) -> str:
        """The data cache of node ``node``: its own folder below ``data.local`` (or the run folder)."""
        return str(Path(self.data.local or self.run_dir / "data_cache") / f"node{node}")

