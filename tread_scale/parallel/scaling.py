"""Scale on paper: step time and weak-scaling efficiency from 1 to N nodes (``dry-run --project``).

The model is deliberately small and every input is printed:

* **Compute** per step and GPU: ``per-GPU batch × training FLOPs per image`` (routing-aware, 3× forward,
  no recomputation) at a stated MFU of a stated peak.
* **Communication** per step and GPU, from the collectives each backend issues (see
  :func:`step_collectives`; the payloads are checked against a real 2-rank gloo run in
  ``tests/parallel/test_scaling.py``). A ring moves ``(g-1)/g`` of an all-gather's or reduce-scatter's full
  payload per rank and ``2(g-1)/g`` of an all-reduce's. Inside a node that goes at the NVLink bus
  bandwidth. A group that spans whole nodes runs one ring per GPU (NCCL channels over a rail-optimised
  fabric, one NIC per GPU), so each ring's single inter-node hop per node carries ``1/k`` of the data and
  the bus bandwidth is ``min(NVLink, k × NIC)`` for ``k`` GPUs per node in the group; an HSDP replica group
  (one GPU per node) gets one NIC's. Each call also pays ``log2(g)`` hops of latency.
* **Overlap**: a stated fraction of the compute time hides communication (bucketed DDP all-reduce,
  FSDP/ZeRO-3 prefetch); the rest of the communication is exposed.

Weak scaling keeps the per-GPU batch, so the global batch grows with the node count; the efficiency at
``n`` nodes is ``step(1 node) / step(n nodes)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from tread_scale.config import DeepSpeedConfig, FSDPConfig

MiB = 1024**2


@dataclass(frozen=True)
class Collective:
    """One kind of collective issued per training step.

    Attributes:
        kind: ``all_gather``, ``reduce_scatter`` or ``all_reduce``.
        payload: Bytes of the full (unsharded) tensors per step and rank, summed over ``calls``: an
            all-gather's output, a reduce-scatter's input, an all-reduce's tensor.
        group: Ranks taking part.
        calls: Separate calls per step (one per FSDP unit or DDP bucket).
        what: What is being moved, for the report.
        one_per_node: The group holds one rank per node (HSDP replicas) rather than whole nodes.
    """

    kind: Literal["all_gather", "reduce_scatter", "all_reduce"]
    payload: float
    group: int
    calls: int
    what: str
    one_per_node: bool = False

    @property
    def wire(self) -> float:
        """Bytes each rank sends (and receives) in a ring implementation."""
        if self.group <= 1:
            return 0.0
        factor = 2.0 if self.kind == "all_reduce" else 1.0
        return factor * (self.group - 1) / self.group * self.payload


@dataclass(frozen=True)
class Assumptions:
    """The stated inputs of a projection (defaults: H100 SXM nodes with 8 GPUs and 400 Gb/s per GPU)."""

    peak_tflops: float = 989.4
    mfu: float = 0.40
    gpus_per_node: int = 8
    nvlink_gbps: float = 360.0  # GB/s of NCCL bus bandwidth per GPU inside a node
    network_gbps: float = 45.0  # GB/s per GPU across nodes (400 Gb/s NIC at ~90%)
    latency_us: float = 5.0  # per hop, log2(group) hops per call
    overlap: float = 0.8  # fraction of compute time that can hide communication

    def describe(self) -> str:
        return (f"peak {self.peak_tflops:.0f} TFLOP/s at MFU {self.mfu:.2f}; {self.gpus_per_node} GPUs per node; "
                f"NVLink {self.nvlink_gbps:.0f} GB/s and network {self.network_gbps:.0f} GB/s per GPU; "
                f"{self.latency_us:.0f} us per hop, log2(group) hops per call; {self.overlap:.0%} of compute "
                "time overlaps communication")


def step_collectives(backend: str, params: int, world: int, *, units: int, compute_bytes: int,
                     fsdp: FSDPConfig | None = None, deepspeed: DeepSpeedConfig | None = None,
                     ddp_bucket_bytes: int = 25 * MiB, grad_reduce_bytes: int = 4) -> list[Collective]:
    """The collectives one optimizer step issues on each rank.

    Args:
        backend: ``ddp``, ``fsdp`` (FSDP2, HSDP with ``fsdp.replicate > 1``) or ``deepspeed``.
        params: Parameter count.
        world: Ranks.
        units: FSDP wrap units (one all-gather / reduce-scatter call each).
        compute_bytes: Bytes per value of the compute dtype (2 under bf16/fp16 autocast, 4 in fp32).
        fsdp: FSDP options (reshard after forward, mixed precision, replicas); ``None``: the defaults.
        deepspeed: ZeRO options (stage); ``None``: the defaults.
        ddp_bucket_bytes: DDP's gradient bucket size (PyTorch default 25 MiB).
        grad_reduce_bytes: Bytes per gradient value reduced: 4, or 2 under ``parallelism.grad_reduce_dtype: bf16``
            (every backend reduces in that dtype: DDP's compress hook, FSDP2's reduce dtype, DeepSpeed's
            ``communication_data_type``).
    """
    if world <= 1:
        return []
    if backend == "ddp":
        grad = params * grad_reduce_bytes  # gradients of fp32 parameters (autocast keeps parameters fp32)
        return [Collective("all_reduce", grad, world, max(1, math.ceil(grad / ddp_bucket_bytes)), "gradients")]
    if backend == "fsdp":
        cfg = FSDPConfig() if fsdp is None else fsdp
        param_b = 4 if cfg.mixed_precision == "full" else compute_bytes
        reduce_b = grad_reduce_bytes
        shard = world // max(1, cfg.replicate)
        out = [Collective("all_gather", params * param_b, shard, units, "parameters for forward")]
        if cfg.reshard_after_forward:
            out.append(Collective("all_gather", params * param_b, shard, units, "parameters again for backward"))
        out.append(Collective("reduce_scatter", params * reduce_b, shard, units, "gradients"))
        if cfg.replicate > 1:
            out.append(Collective("all_reduce", params * reduce_b / shard, cfg.replicate, units,
                                  "gradient shards across replicas", one_per_node=True))
        return out
    if backend == "deepspeed":
        stage = (DeepSpeedConfig() if deepspeed is None else deepspeed).zero_stage
        out = [Collective("reduce_scatter", params * grad_reduce_bytes, world, units, "gradients")]
        if stage == 3:
            out += [Collective("all_gather", params * compute_bytes, world, units, "parameters for forward"),
                    Collective("all_gather", params * compute_bytes, world, units, "parameters for backward")]
        else:
            out.append(Collective("all_gather", params * compute_bytes, world, units, "updated parameters"))
        return out
    raise ValueError(f"unknown backend {backend!r}")


def bus_bandwidth(c: Collective, a: Assumptions) -> float:
    """Bytes/s of bus bandwidth a collective gets (see the module docstring)."""
    if c.one_per_node:
        return a.network_gbps * 1e9
    if c.group <= a.gpus_per_node:
        return a.nvlink_gbps * 1e9
    return min(a.nvlink_gbps, a.gpus_per_node * a.network_gbps) * 1e9


def comm_seconds(collectives: list[Collective], a: Assumptions) -> float:
    """Time of the step's collectives, without overlap."""
    total = 0.0
    for c in collectives:
        if c.group <= 1:
            continue
        total += c.wire / bus_bandwidth(c, a) + c.calls * math.ceil(math.log2(c.group)) * a.latency_us * 1e-6
    return total


@dataclass(frozen=True)
class ProjectedStep:
    """One row of a projection."""

    nodes: int
    world: int
    compute_s: float
    comm_s: float
    step_s: float
    wire_gb: float
    efficiency: float
    images_per_s: float


def project(backend: str, params: int, train_flops_per_image: float, per_gpu_batch: int, *, units: int,
            compute_bytes: int, a: Assumptions, nodes: list[int], fsdp: FSDPConfig | None = None,
            deepspeed: DeepSpeedConfig | None = None, hsdp_shard: int | None = None,
            grad_reduce_bytes: int = 4) -> list[ProjectedStep]:
    """Weak-scaling projection for each node count in ``nodes`` (see the module docstring).

    For HSDP (``fsdp.replicate > 1``) the shard group keeps ``hsdp_shard`` ranks (default: one node) and
    the replicas grow with the node count, the usual way to scale it.
    """
    compute = per_gpu_batch * train_flops_per_image / (a.mfu * a.peak_tflops * 1e12)
    rows: list[ProjectedStep] = []
    base = None
    for n in nodes:
        world = n * a.gpus_per_node
        f = fsdp
        if fsdp is not None and fsdp.replicate > 1:
            shard = min(world, hsdp_shard or a.gpus_per_node)
            f = dataclasses.replace(fsdp, replicate=world // shard)
        cs = step_collectives(backend, params, world, units=units, compute_bytes=compute_bytes, fsdp=f,
                              deepspeed=deepspeed, grad_reduce_bytes=grad_reduce_bytes)
        comm = comm_seconds(cs, a)
        step = compute + max(0.0, comm - a.overlap * compute)
        base = base or step
        rows.append(ProjectedStep(n, world, compute, comm, step, sum(c.wire for c in cs) / 1e9, base / step,
                                  world * per_gpu_batch / step))
    return rows


@dataclass(frozen=True)
class CommShape:
    """What a run's collectives depend on, read from its config and model (:func:`comm_shape`)."""

    params: int
    units: int
    compute_bytes: int
    grad_reduce_bytes: int

    def collectives(self, cfg, world: int) -> list[Collective]:
        """:func:`step_collectives` of ``cfg``'s backend over ``world`` ranks."""
        par = cfg.parallelism
        return step_collectives(par.backend, self.params, world, units=self.units, compute_bytes=self.compute_bytes,
                                fsdp=par.fsdp, deepspeed=par.deepspeed, grad_reduce_bytes=self.grad_reduce_bytes)


def comm_shape(cfg, net) -> CommShape:
    """Parameters, call count (FSDP units, or ZeRO-1/2 reduce buckets) and value sizes of ``cfg``'s collectives."""
    par = cfg.parallelism
    params = sum(p.numel() for p in net.parameters())
    compute_bytes = 4 if cfg.train.precision == "fp32" else 2
    units = sum(1 for m in net.modules() if net.fsdp_wrap_fn(m)) + 1
    if par.backend == "deepspeed" and par.deepspeed.zero_stage < 3:
        units = max(1, math.ceil(params * compute_bytes / par.deepspeed.reduce_bucket_size))
    return CommShape(params, units, compute_bytes, 2 if par.grad_reduce_dtype == "bf16" else 4)


def projection_report(cfg, net, train_flops_per_image: float, per_gpu_batch: int, a: Assumptions,
                      max_nodes: int = 128) -> list[str]:
    """The ``dry-run --project`` table for ``cfg``.

    Args:
        cfg: A :class:`~tread_scale.config.RunConfig` whose backend section is resolved (validated).
        net: The model (on any device, the meta device included).
        train_flops_per_image: Training FLOPs of one image.
        per_gpu_batch: Images per GPU per step.
        a: Hardware and efficiency assumptions.
        max_nodes: Largest node count of the table.

    Returns:
        The report's lines.
    """
    par = cfg.parallelism
    shape = comm_shape(cfg, net)
    nodes, n = [], 1
    while n <= max_nodes:
        nodes.append(n)
        n *= 2
    if nodes[-1] != max_nodes:
        nodes.append(max_nodes)
    rows = project(par.backend, shape.params, train_flops_per_image, per_gpu_batch, units=shape.units,
                   compute_bytes=shape.compute_bytes, a=a, nodes=nodes, fsdp=par.fsdp if par.backend == "fsdp" else None,
                   deepspeed=par.deepspeed if par.backend == "deepspeed" else None,
                   grad_reduce_bytes=shape.grad_reduce_bytes)
    example = shape.collectives(cfg, 2 * a.gpus_per_node)
    lines = [f"projection    weak scaling, {per_gpu_batch} images per GPU per step, {par.backend}"
             + (f" (ZeRO-{par.deepspeed.zero_stage})" if par.backend == "deepspeed" else ""),
             f"  assumptions {a.describe()}",
             "  collectives " + "; ".join(f"{c.kind} of {c.what} {c.payload / 1e9:.2f} GB in {c.calls} call(s)"
                                          for c in example) if example else "  collectives none",
             f"  {'nodes':>6} {'GPUs':>6} {'compute':>9} {'comm':>9} {'step':>9} {'sent/GPU':>9} {'img/s':>10} "
             f"{'efficiency':>10}"]
    for r in rows:
        lines.append(f"  {r.nodes:>6} {r.world:>6} {r.compute_s * 1e3:>7.1f}ms {r.comm_s * 1e3:>7.1f}ms "
                     f"{r.step_s * 1e3:>7.1f}ms {r.wire_gb:>7.2f}GB {r.images_per_s:>10.0f} {r.efficiency:>10.1%}")
    return lines
