"""Cross-field checks of a run config, and the one place backend sections get their defaults.

:func:`validate` checks what the per-field types cannot express (model shape against patch size, routes
against the depth, positive timeouts, files that must exist, …) and resolves the chosen parallelism
backend's section (:func:`resolve_backend_sections`). :func:`validate_parallelism` checks the sharding plan,
also against a world size once it is known.
"""

from __future__ import annotations

from pathlib import Path

from tread_scale.config.schema import DeepSpeedConfig, FSDPConfig, ParallelismConfig, RunConfig
from tread_scale.errors import ConfigError
from tread_scale.routing.routes import resolve_routes


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that the per-field types cannot express; resolves the backend's section.

    Args:
        cfg: A run config as built by the loader; its parallelism section is completed in place
            (:func:`resolve_backend_sections`).

    Returns:
        ``cfg`` itself.

    Raises:
        ConfigError: Naming the offending key (:class:`~tread_scale.errors.RouteError` for a bad route).
    """
    size, patch = cfg.model.size()
    if cfg.model.input_size % patch:
        raise ConfigError(f"model.input_size={cfg.model.input_size} is not divisible by the patch size {patch}")
    if size.hidden_size % size.num_heads:
        raise ConfigError(f"model: hidden_size {size.hidden_size} is not divisible by num_heads {size.num_heads}")
    for key in ("in_channels", "input_size"):
        if getattr(cfg.model, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg.model, key)}")
    validate_family(cfg.model, size, cfg.text, cfg.sampling.prompts)
    resolve_routes(cfg.routes, size.depth)
    validate_route_schedule(cfg)
    validate_time_conventions(cfg)
    if not cfg.data.remote:
        raise ConfigError("data.remote must be set (s3://bucket/prefix or a local folder of MDS shards)")
    for key, value in (("data.stall_timeout", cfg.data.stall_timeout),
                       ("train.preemption_grace", cfg.train.preemption_grace),
                       ("train.barrier_timeout", cfg.train.barrier_timeout),
                       ("train.collective_timeout", cfg.train.collective_timeout)):
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
    resolve_backend_sections(cfg)
    validate_parallelism(cfg.parallelism)
    if cfg.parallelism.grad_reduce_dtype == "bf16" and cfg.train.precision in ("fp32", "amp_fp16"):
        raise ConfigError(f"parallelism.grad_reduce_dtype=bf16 needs train.precision amp_bf16 (or auto on a GPU), "
                          f"got {cfg.train.precision}: fp32 training reduces gradients in fp32")
    if cfg.train.nonfinite_loss == "skip" and cfg.parallelism.backend == "deepspeed":
        raise ConfigError("train.nonfinite_loss=skip is not supported with parallelism.backend=deepspeed "
                          "(the engine owns the optimizer step); use stop")
    ev = cfg.evaluation
    if ev.clip is not None:
        if cfg.model.model_family() != "mmdit" or ev.fid_every is None:
            raise ConfigError("evaluation.clip: the CLIP score scores a text-to-image model's in-training FID samples "
                              "against their captions; it needs model.family: mmdit and evaluation.fid_every")
        if not Path(ev.clip).is_dir():
            raise ConfigError(f"evaluation.clip: {ev.clip!r} is not a folder (a local transformers CLIPModel)")
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


def validate_family(model, size, text=None, prompts=None) -> None:
    """Family-specific keys: the DiT has classes, sincos positions and no text settings; MMDiT widths are
    positive and its encoder folders exist.

    An MMDiT's section is resolved in place to what the network uses, so the saved config says it:
    ``num_classes`` 0 (it takes no class labels; whatever was given, the schema's default included, is
    unused) and ``pos_embed`` ``rope`` when left null (:func:`~tread_scale.factory.build_net`'s default).

    Raises:
        ConfigError: Naming the key that does not apply or is out of range.
    """
    family = model.model_family()
    if family == "dit":
        if model.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {model.num_classes}")
        if text is not None and any(text.folders().values()):
            raise ConfigError(f"text.{'/'.join(k for k, v in text.folders().items() if v)}: text encoders apply to text-conditioned (MMDiT) models, "
                              f"not to {model.name or 'a DiT'}")
        if prompts:
            raise ConfigError(f"sampling.prompts applies to text-conditioned (MMDiT) models, not to "
                              f"{model.name or 'a DiT'}; a DiT's grid shows its classes")
        if model.pos_embed not in (None, "sincos"):
            raise ConfigError(f"model.pos_embed={model.pos_embed}: the DiT uses fixed sincos positions; "
                              "other position embeddings are MMDiT options")
        for key in ("text_dim", "pooled_dim", "text_len"):
            if getattr(model, key) is not None:
                raise ConfigError(f"model.{key} applies to text-conditioned (MMDiT) models, not to {model.name}")
        return
    model.num_classes = 0
    if model.pos_embed is None:
        model.pos_embed = "rope"
    folders = text.folders() if text is not None else {}
    for kind, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"text.{kind}: {folder!r} is not a folder (a local save_pretrained text encoder)")
    if prompts and not any(folders.values()):
        raise ConfigError("sampling.prompts needs the text encoders to embed them: set text.t5 and/or text.clip to the "
                          "local folders the dataset was converted with (or leave sampling.prompts unset: grids then "
                          "show the dataset's first captions)")
    for key in ("text_dim", "pooled_dim", "text_len"):
        value = getattr(model, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {value}")
    if model.pos_embed == "sd3":
        side = model.input_size // model.size()[1]
        if not (model.pos_embed_max_size or 0) >= side:
            raise ConfigError(f"model.pos_embed=sd3 needs model.pos_embed_max_size >= the latent grid's side {side} "
                              f"(SD3 and SD3.5: 192), got {model.pos_embed_max_size}")
    elif model.pos_embed_max_size is not None:
        raise ConfigError("model.pos_embed_max_size applies to model.pos_embed=sd3 only")
    if (model.pos_embed or "rope") == "rope" and (size.hidden_size // size.num_heads) % 4:
        raise ConfigError(f"model.pos_embed=rope needs a head dimension divisible by 4; hidden_size "
                          f"{size.hidden_size} / num_heads {size.num_heads} = {size.hidden_size // size.num_heads}")


def resolve_backend_sections(cfg: RunConfig) -> RunConfig:
    """Give the chosen parallelism backend its section, with the defaults where the config left it out.

    Afterwards ``cfg.parallelism.fsdp`` is an :class:`FSDPConfig` when the backend is ``fsdp`` and
    ``cfg.parallelism.deepspeed`` a :class:`DeepSpeedConfig` when it is ``deepspeed``, so code that runs a
    backend reads its options directly. The other backend's section is left as it is (given, it is an
    error that :func:`validate_parallelism` reports). Calling it again changes nothing.

    Args:
        cfg: The run config, completed in place.

    Returns:
        ``cfg`` itself.
    """
    _resolve_sections(cfg.parallelism)
    return cfg


def _resolve_sections(p: ParallelismConfig) -> None:
    if p.backend == "fsdp" and p.fsdp is None:
        p.fsdp = FSDPConfig()
    elif p.backend == "deepspeed" and p.deepspeed is None:
        p.deepspeed = DeepSpeedConfig()


def validate_route_schedule(cfg: RunConfig) -> None:
    """``routing.schedule``: well-formed, and only with routes to schedule."""
    schedule = cfg.routing.schedule
    schedule.check()
    if not schedule.is_constant and not cfg.routes:
        raise ConfigError("routing.schedule is set but routing.routes is empty: there is no rate to schedule "
                          "(add routes, or remove routing.schedule for a dense run)")


def validate_parallelism(p: ParallelismConfig, world_size: int | None = None) -> None:
    """Check the sharding plan (and, given a world size, its mesh).

    Only the chosen backend's section may be given. That section is filled with its defaults when it is
    missing (as :func:`resolve_backend_sections` does), so a plan checked here can be run as it stands.

    Args:
        p: The parallelism section, completed in place.
        world_size: Ranks the run will have, to check the HSDP mesh against (``None``: not known yet).

    Raises:
        ConfigError: Naming the offending key.
    """
    for other in ("fsdp", "deepspeed"):
        if other != p.backend and getattr(p, other) is not None:
            raise ConfigError(f"parallelism.{other} is set but parallelism.backend is {p.backend!r}; "
                              f"remove the parallelism.{other} section or set parallelism.backend={other}")
    _resolve_sections(p)
    if p.backend == "deepspeed":
        ds = p.deepspeed
        if ds.zero_stage not in (1, 2, 3):
            raise ConfigError(f"parallelism.deepspeed.zero_stage must be 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_params and ds.zero_stage != 3:
            raise ConfigError(f"parallelism.deepspeed.offload_params needs zero_stage 3 (got {ds.zero_stage}): "
                              "only ZeRO-3 partitions parameters")
        for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            if getattr(ds, key) < 1:
                raise ConfigError(f"parallelism.deepspeed.{key} must be >= 1, got {getattr(ds, key)}")
    if p.backend == "fsdp":
        fs = p.fsdp
        if fs.mixed_precision == "pure":
            raise ConfigError("parallelism.fsdp.mixed_precision=pure is replaced by parallelism.grad_reduce_dtype=bf16 "
                              "(with mixed_precision=default), the reduction dtype every backend reads")
        if fs.mixed_precision == "full" and p.grad_reduce_dtype == "bf16":
            raise ConfigError("parallelism.grad_reduce_dtype=bf16 needs parallelism.fsdp.mixed_precision=default: "
                              "full keeps parameters and gradients in fp32")
        if fs.replicate < 1:
            raise ConfigError(f"parallelism.fsdp.replicate must be >= 1, got {fs.replicate}")
        if world_size is not None and world_size % fs.replicate:
            raise ConfigError(f"parallelism.fsdp.replicate={fs.replicate} does not divide the world size "
                              f"{world_size}: the HSDP mesh needs replicate x shard = world size")


def validate_time_conventions(cfg: RunConfig) -> None:
    """Resolve ``model.timestep_scale`` (1000 under rectified flow, 1 under EDM) and check ``objective.shift``.

    Raises:
        ConfigError: For a non-positive scale or shift, or a shift under EDM (it has no time grid to shift).
    """
    if cfg.model.timestep_scale is None:
        cfg.model.timestep_scale = 1000.0 if cfg.objective.kind == "rf" else 1.0
    if not cfg.model.timestep_scale > 0:
        raise ConfigError(f"model.timestep_scale={cfg.model.timestep_scale} must be positive")
    if not cfg.objective.shift > 0:
        raise ConfigError(f"objective.shift={cfg.objective.shift} must be positive (1.0: no shift)")
    if cfg.objective.kind != "rf" and cfg.objective.shift != 1.0:
        raise ConfigError(f"objective.shift={cfg.objective.shift} applies to rectified flow (objective.kind=rf) only; "
                          "EDM's noise levels are set by P_mean/P_std and the sampler's sigma grid")
