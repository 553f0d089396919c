"""``tread-scale convert``: write MDS shards of latents, idempotently, locally or to S3.

Layout of a converted dataset::

    <out>/index.json                 merged index over every group
    <out>/tread_meta.json            the dataset's facts (shape, dtype, VAE, scaling factor, classes, text)
    <out>/text_empty.npz             captioned datasets: the empty prompt's embedding
    <out>/group_00000/shard.*.mds.zstd, index.json
    <out>/_tread_convert_done.json   written last; records the arguments' fingerprint

A bucketed source (``--buckets``) plans its items bucket by bucket; its groups never mix buckets (each
bucket is cut every ``group_size`` samples, whatever ``--processes``), and each group's writer declares its
bucket's latent shape, so the merged index holds shards of several shapes, in sample order.

Work is split into groups of samples; each group is written by one worker process (``--processes N``)
into a staging folder and marked done there, so an interrupted run redoes only unfinished groups. An
``s3://`` output is staged in a local folder (``--work-dir``, else a temporary one) and uploaded shards
first, index and metadata next, the done-file last: nothing points at a missing shard. A re-run with the
same arguments finds the done-file and skips the work.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tread_scale.data import object_store as s3
from tread_scale.data.metadata import BUCKET_COLUMNS, EMPTY_PROMPT_FILE, META_FILE, LatentMetadata, text_columns
from tread_scale.data.conversion.buckets import CROP_RULE
from tread_scale.data.conversion.sources import Plan, Source, bucket_starts
from tread_scale.errors import DatasetError

log = logging.getLogger(__name__)

DONE_FILE = "_tread_convert_done.json"
GROUP_DONE = ".group_done.json"
GROUP_EMPTY_PROMPT = ".empty_prompt.npz"  # a captioned group's empty prompt (dot files stay in staging)
INDEX_FILE = "index.json"


@dataclass
class ConvertOptions:
    """Options of a conversion (all part of its fingerprint except ``processes`` and ``work_dir``).

    Attributes:
        processes: Worker processes.
        group_size: Samples per group (the unit of parallelism and of resumption). Square datasets use
            ``min(group_size, ceil(n / processes))``; bucketed ones cut each bucket every ``group_size``
            samples whatever ``processes`` (the shards are then the same bytes for any ``--processes``; lower
            it for more parallelism on a small dataset).
        shard_size: MDS shard size limit, e.g. ``64mb``.
        compression: MDS compression (``zstd`` by default; ``none`` for raw).
        dtype: Stored latent dtype.
        work_dir: Staging folder for ``s3://`` outputs (kept, so reruns resume); temporary when ``None``.
        overwrite: Replace an output that holds a different or unfinished conversion.
        progress: Show a progress bar.
    """

    processes: int = 1
    group_size: int = 20000
    shard_size: str = "64mb"
    compression: str = "zstd"
    dtype: str = "float16"
    work_dir: str | None = None
    overwrite: bool = False
    progress: bool = True


def fingerprint(source: Source, opts: ConvertOptions) -> str:
    d = {"source": source.describe(), "group_size": opts.group_size, "shard_size": opts.shard_size,
         "compression": opts.compression, "dtype": opts.dtype, "format": 1}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def columns_for(plan: Plan, dtype: str, bucket: int | None = None) -> dict[str, str]:
    """The MDS columns of a group: ``bucket`` (an index into ``plan.buckets``) gives its latent shape and the
    ``orig_size``/``crop_box`` columns of bucketed datasets."""
    c, h, w = plan.latent_shape if bucket is None else plan.buckets[bucket]["latent_shape"]
    columns = {"latent": f"ndarray:{dtype}:{c},{h},{w}", "label": "int", "id": "int"}
    if bucket is not None:
        columns.update(BUCKET_COLUMNS)
    if plan.text is not None:
        columns.update(text_columns(plan.text))
    return columns


def plan_groups(plan: Plan, group_size: int, processes: int) -> list[tuple[str, list]]:
    """The groups of a plan: ``(name, [(plan index, item), ...])`` in plan order.

    Square plans are cut every ``min(group_size, ceil(n / processes))`` items; bucketed plans cut each bucket
    every ``group_size`` items from its start, so no group mixes buckets and the cut does not depend on
    ``processes``.
    """
    n = len(plan.items)
    if plan.buckets is None:
        size = max(1, min(group_size, math.ceil(n / max(processes, 1))))
        bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    else:
        size = max(1, group_size)
        bounds = [(lo, min(lo + size, b["start"] + b["count"]))
                  for b in plan.buckets for lo in range(b["start"], b["start"] + b["count"], size)]
    return [(f"group_{g:05d}", [(i, plan.items[i]) for i in range(lo, hi)]) for g, (lo, hi) in enumerate(bounds)]


def group_bucket(plan: Plan, pairs: list) -> int | None:
    """The bucket (index into ``plan.buckets``) of a group's items; ``None`` for square plans."""
    if plan.buckets is None or not pairs:
        return None
    return bisect.bisect_right(bucket_starts(plan), pairs[0][0]) - 1


def _bucket_row(sample) -> dict[str, np.ndarray]:
    return {"orig_size": np.asarray(sample.orig_size, np.int32), "crop_box": np.asarray(sample.crop_box, np.int32)}


def _write_group(source: Source, plan: Plan, pairs: list, group_dir: str, fp: str, opts: ConvertOptions,
                 progress_queue=None) -> dict:
    """Write one group of samples as MDS shards (runs in a worker process)."""
    from streaming import MDSWriter

    gdir = Path(group_dir)
    if gdir.exists():
        shutil.rmtree(gdir)  # an unfinished earlier attempt
    dtype = np.dtype(opts.dtype)
    count, pending, truncated, clipped = 0, 0, 0, 0
    label_counts: dict[int, int] = {}
    longest: dict[str, int] = {}
    unknown: dict[str, dict] = {}
    if plan.text is not None:
        from tread_scale.data.conversion.captions import text_row
        from tread_scale.data.conversion.text_encoder import merge_unknown_words
    compression = None if opts.compression in ("none", "") else opts.compression
    bucket = group_bucket(plan, pairs)
    with MDSWriter(out=str(gdir), columns=columns_for(plan, opts.dtype, bucket), compression=compression,
                   size_limit=opts.shard_size, hashes=["xxh64"], progress_bar=False) as writer:
        for sample in source.load(pairs, plan):
            row = {"latent": np.ascontiguousarray(sample.latent.astype(dtype)), "label": int(sample.label),
                   "id": int(sample.id)}
            if bucket is not None:
                row.update(_bucket_row(sample))
            if plan.text is not None:
                text, cut = text_row(sample, plan.text)
                row.update(text)
                truncated += bool(sample.text.get("truncated"))
                clipped += cut
                for kind, n in sample.text.get("tokens", {}).items():
                    longest[kind] = max(longest.get(kind, 0), int(n))
                merge_unknown_words(unknown, sample.text.get("unknown") or {}, {})
            writer.write(row)
            count += 1
            pending += 1
            label_counts[sample.label] = label_counts.get(sample.label, 0) + 1
            if progress_queue is not None and pending >= 32:
                progress_queue.put(pending)
                pending = 0
    if progress_queue is not None and pending:
        progress_queue.put(pending)
    skipped = len(pairs) - count
    if progress_queue is not None and skipped:
        progress_queue.put(skipped)
    result = {"fingerprint": fp, "samples": count, "labels": {str(k): v for k, v in label_counts.items()},
              "range": _range_of(pairs)}
    if bucket is not None:
        result["bucket"] = bucket
    if plan.text is not None:
        np.savez(gdir / GROUP_EMPTY_PROMPT, **source.empty_prompt(plan))
        result.update(truncated=truncated, clipped=clipped, longest_tokens=longest, unknown_words=unknown)
    (gdir / GROUP_DONE).write_text(json.dumps(result))
    return result


def _range_of(pairs: list) -> list[int]:
    """The plan indices ``[first, last + 1]`` of a group: a marker counts only for the same items."""
    return [int(pairs[0][0]), int(pairs[-1][0]) + 1] if pairs else [0, 0]


def _finish_text(staging: Path, first_group: str, plan: Plan, results: list[dict]):
    """The dataset's ``text`` metadata: counts from the groups; the empty prompt copied beside the index."""
    from dataclasses import replace

    from tread_scale.data.metadata import empty_prompt_digest
    from tread_scale.data.conversion.text_encoder import merge_unknown_words, warn_unknown_words

    with np.load(staging / first_group / GROUP_EMPTY_PROMPT) as z:
        arrays = {k: z[k] for k in ("text_emb", "text_mask", "text_pooled")}
    tmp = staging / (EMPTY_PROMPT_FILE + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(staging / EMPTY_PROMPT_FILE)
    truncated = sum(r.get("truncated", 0) for r in results)
    clipped = sum(r.get("clipped", 0) for r in results)
    longest: dict[str, int] = {}
    unknown: dict[str, dict] = {}
    for r in results:
        for kind, n in r.get("longest_tokens", {}).items():
            longest[kind] = max(longest.get(kind, 0), int(n))
        merge_unknown_words(unknown, r.get("unknown_words", {}), {})
    if truncated:
        log.warning("%d caption(s) had more tokens than max_length=%d and were truncated", truncated,
                    plan.text.max_length)
    if clipped:
        log.warning("%d caption string(s) were longer than %d bytes and are stored cut (their embeddings are whole)",
                    clipped, plan.text.caption_bytes)
    warn_unknown_words(unknown, "caption")
    return replace(plan.text, empty_prompt_sha256=empty_prompt_digest(arrays), truncated=truncated, clipped=clipped,
                   longest_tokens=longest)


def dataset_buckets(plan: Plan, results: list[dict]) -> list[dict] | None:
    """The metadata's ``buckets``: the plan's buckets with the samples the groups wrote, in sample order.

    ``start`` counts written samples (a skipped unreadable image shifts the later ones); a bucket left
    without samples is dropped.
    """
    if plan.buckets is None:
        return None
    counts = [0] * len(plan.buckets)
    for r in results:
        counts[r["bucket"]] += r["samples"]
    out, start = [], 0
    for b, count in zip(plan.buckets, counts):
        if count:
            out.append({"latent_shape": list(b["latent_shape"]), "image_size": list(b["image_size"]),
                        "start": start, "count": count})
            start += count
    return out


def merge_group_indexes(root: Path, groups: list[str]) -> int:
    """Write ``root/index.json`` listing every group's shards (paths relative to ``root``)."""
    shards = []
    for g in groups:
        index = json.loads((root / g / INDEX_FILE).read_text())
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{g}/{shard[key]['basename']}"
            shards.append(shard)
    tmp = root / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps({"version": 2, "shards": shards}))
    tmp.replace(root / INDEX_FILE)
    return len(shards)


def _read_done(out: str) -> dict | None:
    raw = s3.read_bytes(s3.join_uri(out, DONE_FILE))
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"fingerprint": "<unreadable>"}


def _ours(staging: Path | None, fp: str) -> bool:
    """Whether ``staging`` holds group markers of this very conversion (an interrupted earlier run)."""
    if staging is None or not staging.is_dir():
        return False
    for marker in staging.glob(f"group_*/{GROUP_DONE}"):
        try:
            if json.loads(marker.read_text()).get("fingerprint") == fp:
                return True
        except ValueError:
            continue
    return False


def _check_output(out: str, fp: str, opts: ConvertOptions, staging: Path | None) -> bool:
    """Return True if ``out`` already holds this conversion; raise if it holds something else."""
    done = _read_done(out)
    if done is not None and done.get("fingerprint") == fp:
        return True
    if opts.overwrite or (done is None and _ours(staging, fp)):
        return False
    if done is not None:
        raise DatasetError(f"{out} already holds a different conversion (fingerprint {done.get('fingerprint')}, "
                           f"this one {fp}); pass --overwrite to replace it, or choose another output")
    if s3.read_bytes(s3.join_uri(out, INDEX_FILE)) is not None:
        raise DatasetError(f"{out} already holds an index.json that this tool did not finish writing; "
                           "pass --overwrite to replace it, or choose another output")
    return False


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="convert", disable=not enabled, dynamic_ncols=True)


def _run_groups(source: Source, plan: Plan, todo: list[tuple[str, list]], staging: Path, fp: str,
                opts: ConvertOptions, bar) -> None:
    if opts.processes <= 1 or len(todo) <= 1:
        queue = _ListQueue(bar.update)
        for name, pairs in todo:
            _write_group(source, plan, pairs, str(staging / name), fp, opts, queue)
        return
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set() or not queue.empty():
                try:
                    bar.update(queue.get(timeout=0.2))
                except Exception:  # noqa: BLE001 - queue.Empty from a manager proxy
                    continue

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        try:
            with ProcessPoolExecutor(max_workers=opts.processes, mp_context=ctx) as pool:
                futures = [pool.submit(_write_group, source, plan, pairs, str(staging / name), fp, opts, queue)
                           for name, pairs in todo]
                for f in futures:
                    f.result()
        finally:
            stop.set()
            thread.join()


class _ListQueue:
    """In-process stand-in for a progress queue."""

    def __init__(self, update: Callable[[int], None]) -> None:
        self.put = update


def convert(source: Source, out: str, opts: ConvertOptions | None = None) -> LatentMetadata:
    """Convert ``source`` into an MDS dataset at ``out`` (a local folder or ``s3://bucket/prefix``).

    Args:
        source: What to convert.
        out: Destination.
        opts: Options.

    Returns:
        The dataset's metadata (read back when the conversion was already done).

    Raises:
        DatasetError: For bad input (naming the file) or an output that holds something else.
        ObjectStoreError: For an unreachable or misconfigured S3 output, before any work starts.
    """
    opts = opts or ConvertOptions()
    remote = s3.is_s3(out)
    if remote:
        s3.check_s3_access(out)
    fp = fingerprint(source, opts)
    known_staging = Path(opts.work_dir) if remote and opts.work_dir else (None if remote else Path(out))
    if _check_output(out, fp, opts, known_staging):
        log.info("%s already holds this conversion (fingerprint %s); nothing to do", out, fp)
        from tread_scale.data.metadata import read_metadata

        return read_metadata(out)

    t0 = time.time()
    plan = source.plan()
    n = len(plan.items)
    groups = plan_groups(plan, opts.group_size, opts.processes)
    tmp = None
    if remote:
        if opts.work_dir:
            staging = Path(opts.work_dir)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="tread-convert-")
            staging = Path(tmp.name)
    else:
        staging = Path(out)
    staging.mkdir(parents=True, exist_ok=True)
    if opts.overwrite:
        if remote:
            log.info("--overwrite: deleted %d object(s) under %s", s3.delete_prefix(out), out)
        for p in [staging / DONE_FILE, staging / INDEX_FILE, staging / META_FILE, staging / EMPTY_PROMPT_FILE,
                  *staging.glob("group_*")]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    try:
        todo, done_count = [], 0
        for name, pairs in groups:
            marker = staging / name / GROUP_DONE
            mark = json.loads(marker.read_text()) if marker.is_file() else {}
            if mark.get("fingerprint") == fp and mark.get("range") == _range_of(pairs):
                done_count += len(pairs)
            else:
                todo.append((name, pairs))
        log.info("converting %d samples of %s into %d group(s) at %s (%d already done), %d process(es)",
                 n, source.kind, len(groups), out, len(groups) - len(todo), opts.processes)
        with _progress_bar(n, opts.progress) as bar:
            bar.update(done_count)
            _run_groups(source, plan, todo, staging, fp, opts, bar)
        results = [json.loads((staging / name / GROUP_DONE).read_text()) for name, _ in groups]
        num_samples = sum(r["samples"] for r in results)
        if num_samples == 0:
            raise DatasetError(f"no samples were written from {source.describe().get('folder', source.kind)}")
        num_shards = merge_group_indexes(staging, [name for name, _ in groups])
        text = None if plan.text is None else _finish_text(staging, groups[0][0], plan, results)
        buckets = dataset_buckets(plan, results)
        meta = LatentMetadata(latent_shape=plan.latent_shape, num_classes=plan.num_classes, num_samples=num_samples,
                              dtype=opts.dtype, vae=plan.vae, scaling_factor=plan.scaling_factor,
                              class_names=plan.class_names, source=json.dumps(source.describe(), sort_keys=True),
                              text=text, buckets=buckets, bucket_spec=plan.bucket_spec if buckets else None,
                              crop_rule=CROP_RULE if buckets else None)
        (staging / META_FILE).write_text(meta.to_json())
        done = {"fingerprint": fp, "samples": num_samples, "shards": num_shards, "seconds": round(time.time() - t0, 2)}
        top = [staging / INDEX_FILE, staging / META_FILE]
        if text is not None:
            done["text"] = {"truncated": text.truncated, "clipped": text.clipped}
            top.append(staging / EMPTY_PROMPT_FILE)
        if remote:
            shard_files = sorted(p for p in staging.glob("group_*/*") if p.is_file() and not p.name.startswith("."))
            s3.upload_tree(staging, out, shard_files)
            s3.upload_tree(staging, out, top)
            (staging / DONE_FILE).write_text(json.dumps(done))
            s3.upload_tree(staging, out, [staging / DONE_FILE])
        else:
            (staging / DONE_FILE).write_text(json.dumps(done))
        log.info("wrote %d samples in %d shard(s) to %s in %.1f s", num_samples, num_shards, out, time.time() - t0)
        return meta
    finally:
        if tmp is not None:
            tmp.cleanup()
