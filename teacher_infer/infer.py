"""The inference loop: data → views → teacher → top-k → label store.

``run(cfg)`` reads top-down: set up the process (device, torchrun rank), list the data,
load the teacher, create or resume the store (rank 0 first), split the missing chunks
round-robin over the ranks, decode and forward batch by batch, write, and summarise.

Batches never straddle a store chunk, so the rows of a chunk are always computed in the
same batches — a resumed run, a two-rank run and a single run give bit-identical stores
on a deterministic device.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from labelstore import (DEFAULT_CHUNK_ROWS, TAR_FIELDS, IncompleteRunError, OutputLock,
                        check_disjoint, disk_bytes, fingerprint, human_size, local_path,
                        progress_bar, read_lines)

from .config import InferConfig
from .data import Samples, find_samples, labels_by_name, read_class_names
from .images import ImageSource
from .imaging.decoders import resolve_decoder
from .imaging.views import ViewSpec
from .runtime import (Dist, allow_tf32, autocast, cpus_per_rank, resolve_device,
                      resolve_precision, saved_class_names, set_threads)

FAILED_FILE = "failed.txt"
BOX_CONVENTION = ("(y0, x0, h, w) fractions of the EXIF-oriented RGB image; a view resamples "
                  "that region (PIL resize(box=...) semantics) to input_size, then mirrors it "
                  "if flipped")


@dataclass
class RunSummary:
    """What one ``run`` did (all ranks together)."""

    out: str
    images: int                 # rows computed by this run
    failures: int               # of them, rows that could not be decoded
    skipped: int                # rows already in the store (resume)
    total_failures: int         # invalid rows in the whole store
    wall_s: float               # the whole run, set-up (imports, model, store) included
    loop_s: float               # decoding + forward + writing only
    store_bytes: int | None
    complete: bool
    decoder: str
    device: str
    world_size: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Throughput of the inference loop (set-up time excluded)."""
        return self.images / self.loop_s if self.loop_s > 0 else 0.0

    def __str__(self) -> str:
        size = human_size(self.store_bytes)
        state = "complete" if self.complete else "INCOMPLETE"
        resumed = f", {self.skipped:,} already done" if self.skipped else ""
        return (f"infer-teacher: {self.images:,} images ({self.failures:,} failed{resumed}) in "
                f"{self.wall_s:.1f} s, {self.images_per_s:,.1f} img/s after "
                f"{self.wall_s - self.loop_s:.1f} s of set-up, on {self.world_size}× "
                f"{self.device} with {self.decoder} → {self.out} ({size}, {state})")


# -- set-up ------------------------------------------------------------------------
def _labels_and_names(samples: Samples, num_classes: int, names_file: str | None,
                      checkpoint: str | None = None) -> tuple[np.ndarray, list[str] | None]:
    """Labels in the model's class space and the class names to record.

    The model's class names come from ``--class-names`` or, without it, from a checkpoint
    that records them (train-student's); class folders are then matched to them by name
    (``labels_by_name``). Without names, folders keep ImageFolder's sorted index.
    """
    names = read_class_names(names_file) if names_file else None
    named_by = f"--class-names {names_file}"
    if names is not None and len(names) != num_classes:
        raise ValueError(f"--class-names {names_file} has {len(names)} names but the model has "
                         f"{num_classes} classes")
    if names is None:
        names = saved_class_names(checkpoint, num_classes)
        named_by = f"--checkpoint {checkpoint}"
    labels = samples.labels
    if samples.source == "folder":
        folders = samples.class_names or []
        if names is not None:
            labels = labels_by_name(samples, num_classes, names, option="--data",
                                    named_by=named_by)
        elif len(folders) > num_classes:
            raise ValueError(f"{samples.root} has {len(folders)} class folders but the model has "
                             f"{num_classes} classes (pass --num-classes or --class-names)")
        if names is None and len(folders) == num_classes:
            names = list(folders)
    if len(labels) and labels.max() >= num_classes:
        row = int(np.argmax(labels))
        raise ValueError(f"label {int(labels[row])} of {samples.keys[row]} is >= the model's "
                         f"{num_classes} classes")
    return labels, names


def data_config_view_spec(cfg: InferConfig, data_config: dict[str, Any]) -> ViewSpec:
    """The views ``cfg`` asks for at the teacher's preprocessing (``data_config``).

    Public, like :func:`make_forward` and :func:`data_path`, so that
    benchmarks/teacher_infer_bench.py measures its floors (model only, decode only) with the
    loop's own pieces."""
    _, height, width = data_config["input_size"]
    return ViewSpec(views=cfg.views, input_size=(int(height), int(width)),
                    crop_pct=float(data_config["crop_pct"]),
                    crop_mode=data_config.get("crop_mode") or "center",
                    crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio, seed=cfg.seed)


def _preprocessing(spec: ViewSpec, data_config: dict[str, Any]) -> dict[str, Any]:
    return {"input_size": [int(v) for v in data_config["input_size"]],
            "interpolation": data_config["interpolation"],
            "mean": [float(v) for v in data_config["mean"]],
            "std": [float(v) for v in data_config["std"]],
            "crop_pct": spec.crop_pct, "crop_mode": spec.crop_mode, "views": spec.views,
            "crop_scale": list(spec.crop_scale), "crop_ratio": list(spec.crop_ratio),
            "flip_prob": spec.flip_prob, "seed": spec.seed, "box_convention": BOX_CONVENTION}


# -- the store: create, or check and resume -------------------------------------------
def _settings(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes a resumed run must agree with, flattened to ``a.b`` names."""
    teacher = attrs.get("teacher") or {}
    dataset = attrs.get("dataset") or {}
    flat = {f"teacher.{k}": teacher.get(k) for k in ("model", "weights", "checkpoint_sha256",
                                                      "num_classes")}
    flat.update({f"dataset.{k}": dataset.get(k) for k in ("fingerprint", "num_samples",
                                                          "labels_sha256",
                                                          "shards_fingerprint")})
    flat.update({f"preprocessing.{k}": v for k, v in (attrs.get("preprocessing") or {}).items()})
    flat.update({k: attrs.get(k) for k in ("topk", "views", "temperature", "embedding_dim")})
    flat["compute.precision"] = (attrs.get("compute") or {}).get("precision")
    flat["views_from.fingerprint"] = (attrs.get("views_from") or {}).get("fingerprint")
    flat["augment"] = attrs.get("augment")
    flat["logits"] = bool(attrs.get("logits"))
    return {k: json.loads(json.dumps(v)) for k, v in flat.items()}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:20] + "…"


def check_resumable(store_attrs: dict[str, Any], attrs: dict[str, Any], out: str,
                    chunk_rows: int | None) -> None:
    """ValueError naming every setting in which ``attrs`` differ from the store's."""
    old, new = _settings(store_attrs), _settings(attrs)
    diffs = [f"{k} (store {_short(old.get(k))}, now {_short(new.get(k))})"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if chunk_rows is not None and int(store_attrs.get("chunk_rows", chunk_rows)) != chunk_rows:
        diffs.append(f"chunk_rows (store {store_attrs.get('chunk_rows')}, now {chunk_rows})")
    if diffs:
        raise ValueError(f"{out} was written with different settings: {'; '.join(diffs)}. "
                         "Pass --overwrite to replace it (or rerun with the store's settings "
                         "to resume)")


@dataclass(frozen=True)
class Plan:
    """Rank 0's view of the store before any rank writes: what this run computes."""

    todo: list[int]        # chunks not done when the run started, in order
    skipped: int           # rows already done (resume)
    resumed: bool

    def chunks_of(self, dist: Dist) -> list[int]:
        """This rank's share, round-robin: a function of the plan alone, so ranks that
        start seconds apart still split the same list and no chunk falls to nobody."""
        return self.todo[dist.rank::dist.world_size]


def _open_or_create(cfg: InferConfig, samples: Samples, labels: np.ndarray, attrs: dict,
                    num_classes: int, embedding_dim: int | None,
                    records: "Records | None" = None) -> Plan:
    """Rank 0, before any rank writes: the store ready for writing, and the plan."""
    import labelstore

    store = None
    if labelstore.exists(cfg.out) and not cfg.overwrite:
        try:
            store = labelstore.open(cfg.out)
        except labelstore.UnfinishedStoreError:   # no row in it: created afresh below
            store = None
    if store is not None:
        check_resumable(store.attrs, attrs, cfg.out, cfg.chunk_rows)
        writer = labelstore.open(cfg.out, mode="a")
        todo = [int(c) for c in np.flatnonzero(~writer.done_chunks())]
        skipped = len(writer) - sum(hi - lo for lo, hi in map(writer.chunk_range, todo))
        return Plan(todo=todo, skipped=skipped, resumed=True)
    writer = labelstore.create(cfg.out, keys=samples.keys, num_classes=num_classes,
                               topk=cfg.topk, views=cfg.views, labels=labels, attrs=attrs,
                               chunk_rows=cfg.chunk_rows or DEFAULT_CHUNK_ROWS,
                               overwrite=cfg.overwrite, embedding_dim=embedding_dim,
                               augment_dims=records and records.dims, logits=cfg.store_logits,
                               partners=records and records.partners,
                               tar_fields=TAR_FIELDS if samples.tar is not None else None)
    return Plan(todo=list(range(writer.num_chunks)), skipped=0, resumed=False)


# -- failures -------------------------------------------------------------------------
def _append_failures(out: str, rank: int, lines: list[str], pending: list[str]) -> None:
    """Before a chunk can be marked done, its failures are on disk (a crash loses none).
    Object storage cannot append: there the lines wait in ``pending`` for the end of the
    run (a crashed run's reasons are lost; its rows stay invalid, listed as 'unknown')."""
    if not lines:
        return
    folder = local_path(out)
    if folder is None:
        pending.extend(lines)
        return
    with open(os.path.join(folder, f"failed.rank{rank}.part"), "a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        os.fsync(handle.fileno())


def _read_reasons(lines, reasons: dict[str, str]) -> None:
    for line in lines:
        key, _, reason = line.rstrip("\n").partition("\t")
        reasons[key] = reason


def _merge_failures(out: str, keys: list[str], failed: np.ndarray, pending: list[str]) -> int:
    """Rank 0, at the end: failed.txt = every row that was tried and failed (``failed``:
    invalid rows of done chunks; rows never written are missing, not failed), with its
    latest reason. No failures, no file."""
    import fsspec

    reasons: dict[str, str] = {}
    folder = local_path(out)
    fs, inner = (None, None) if folder is not None else fsspec.core.url_to_fs(out)
    target = os.path.join(folder, FAILED_FILE) if folder is not None else f"{inner}/{FAILED_FILE}"
    parts = sorted(f for f in os.listdir(folder) if f.startswith("failed.rank")) if folder else []
    for path in [target] + [os.path.join(folder, name) for name in parts]:
        if fs is None and os.path.exists(path):
            _read_reasons(read_lines(path, "failures file"), reasons)
        elif fs is not None and fs.exists(path):
            _read_reasons(read_lines(f"{str(out).rstrip('/')}/{FAILED_FILE}", "failures file"),
                          reasons)
    _read_reasons(pending, reasons)
    invalid = [keys[row] for row in np.flatnonzero(failed)]
    text = "".join(f"{key}\t{reasons.get(key, 'unknown')}\n" for key in invalid)
    if fs is not None:
        if invalid:
            with fs.open(target, "w", encoding="utf-8") as handle:
                handle.write(text)
        elif fs.exists(target):
            fs.rm(target)
        return len(invalid)
    if invalid:
        with open(f"{target}.tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(f"{target}.tmp", target)
    elif os.path.exists(target):
        os.remove(target)
    for name in parts:
        os.remove(os.path.join(folder, name))
    return len(invalid)


# -- augmentation records -------------------------------------------------------------
@dataclass(frozen=True)
class Records:
    """The augmentation of a run (docs/format.md, "Augmentation records"): what the loader
    applies (``augmentation``), the store's record sizes, ``augment`` attribute and partner
    table."""

    dims: dict[str, int]
    attrs: dict[str, Any]
    partners: dict[str, Any] | None = None
    augmentation: Any = None        # imaging.augment.source.Augmentation; None: drawn with
    spec: Any = None                # these settings (AugmentSpec), once the chunk size is known

    def for_store(self, samples: Samples, view_spec: ViewSpec, chunk_rows: int):
        """What the loader applies, for a store of ``chunk_rows`` rows per chunk (its own:
        a resumed store keeps the partners of its chunks)."""
        from .imaging.augment.source import PlannedAugmentation

        if self.augmentation is not None:
            return self.augmentation
        return PlannedAugmentation(
            self.spec, keys=samples.keys, images=ImageSource(samples.root), tar=samples.tar,
            seed=view_spec.seed, chunk_rows=chunk_rows, views=view_spec.views)


def check_augmentation(cfg: InferConfig, rows: int) -> None:
    """Before anything is written: a store of ``rows`` rows can hold the records asked for."""
    cfg.augment_spec().check_store(rows=rows, views=cfg.views,
                                   chunk_rows=cfg.chunk_rows or DEFAULT_CHUNK_ROWS)


def _records(cfg: InferConfig, reference, data_config: dict[str, Any]) -> Records | None:
    """The records of this run: the reference store's (``--views-from``: the same augmented
    views), or drawn with the options' settings and the teacher's mean as fill."""
    from .imaging.augment.policy import fill_from_mean

    if reference is not None:
        if not reference.augmented:
            return None
        from .imaging.augment.source import StoredAugmentation

        store = reference.store
        return Records(dims=dict(store.augment_dims), attrs=reference.augment,
                       partners=store.partner_table(),
                       augmentation=StoredAugmentation(store,
                                                       ImageSource(reference.samples.root)))
    settings = cfg.augment_spec(fill_from_mean(data_config["mean"]))
    if not settings.enabled:
        return None
    return Records(dims=settings.dims(), attrs=settings.attrs(), spec=settings)


# -- compute --------------------------------------------------------------------------
def make_forward(model, embeddings: bool, compile_model: bool):
    """``x → (logits, pre-logit features or None)`` through timm's features/head split."""
    import torch

    def forward(x):
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pooled = model.forward_head(features, pre_logits=True) if embeddings else None
        return logits, pooled

    return torch.compile(forward) if compile_model else forward


def in_chunks(fn: Callable, x, size: int) -> tuple:
    """``fn(x)`` computed ``size`` rows of ``x`` at a time, its outputs (a tuple of tensors or
    None) concatenated: the result of one call, the memory of a ``size``-row call. A batch
    of many views (``--views 2000``) thus needs no more than ``--batch-size`` images'
    activations; every row is computed as it would be alone (the model is in eval mode)."""
    import torch

    if len(x) <= size:
        return fn(x)
    parts = [fn(x[lo:lo + size]) for lo in range(0, len(x), size)]
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))


def top_k(logits, k: int, temperature: float):
    """Top-k softmax probabilities at ``temperature`` and the residual mass, in float32."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    top_probs, top_indices = probs.topk(k, dim=-1)
    residual = (1.0 - top_probs.sum(-1)).clamp_(min=0.0)
    return top_indices, top_probs, residual


def top_logits(logits, indices, temperature: float):
    """The logits of the top-k classes ``indices`` and the log-partition at ``temperature``
    (float32): ``probs = exp(logits / T - log_partition)`` (docs/format.md, "Stored
    logits")."""
    import torch

    logits = logits.float()
    return (torch.gather(logits, -1, indices),
            torch.logsumexp(logits / temperature, dim=-1))


# float16, the stored dtype of embeddings, holds magnitudes up to 65504; rows that reach
# half of that are scaled down (below), so that rounding cannot overflow either.
FLOAT16_ROOM = 32768.0


def fit_float16(rows: np.ndarray) -> np.ndarray:
    """``rows`` (n, D) float32, each row whose largest magnitude exceeds FLOAT16_ROOM divided
    in place by the power of two that brings it below: exact, and the direction — all that
    dedup's cosine uses — is kept, where float16 would store inf (docs/format.md)."""
    if not rows.size:
        return rows
    peak = np.abs(rows).max(axis=1)
    over = peak > FLOAT16_ROOM            # NaN rows are not scaled: the writer refuses them
    if over.any():
        rows[over] /= np.exp2(np.ceil(np.log2(peak[over] / FLOAT16_ROOM)))[:, None]
    return rows


def _embedding_dim(model, spec: ViewSpec, device) -> int:
    import torch

    with torch.inference_mode():
        x = torch.zeros((1, 3) + tuple(spec.input_size), device=device)
        return int(model.forward_head(model.forward_features(x), pre_logits=True).shape[-1])


# -- the run --------------------------------------------------------------------------
def run(cfg: InferConfig) -> RunSummary:
    """Run the teacher of ``cfg`` over its data set into ``cfg.out``; see the module doc."""
    started = time.perf_counter()
    check_disjoint(cfg.out, {"--data": cfg.data, "--root": cfg.root,
                             "--class-names": cfg.class_names, "--checkpoint": cfg.checkpoint,
                             "--views-from": cfg.views_from})
    dist = Dist.from_env()
    set_threads(cfg.threads, dist)
    device = resolve_device(cfg.device, dist)
    allow_tf32(device)
    dist.init(device)
    lock = OutputLock(cfg.out, command="infer-teacher")
    try:
        dist.on_main(lock.acquire)  # one run per store; the ranks of this run share it
        return _run(cfg, dist, device, started)
    finally:
        lock.release()
        dist.close()


def _store_attrs(cfg: InferConfig, samples: Samples, labels: np.ndarray, teacher, spec: ViewSpec,
                 class_names: list[str] | None, embedding_dim: int | None,
                 decoder_name: str, device, precision: str,
                 views_from: dict | None, records: "Records | None" = None) -> dict[str, Any]:
    import labelstore

    attrs = {
        "teacher": teacher.record,
        "preprocessing": _preprocessing(spec, teacher.data_config),
        # fingerprint and num_samples are labelstore.create's too; here so a resume compares them
        "dataset": {"root": samples.root, "source": samples.source,
                    "data": cfg.data and _spec_path(cfg.data), "num_samples": len(samples),
                    "fingerprint": labelstore.fingerprint(samples.keys),
                    "labels_sha256": labelstore.fingerprint(str(v) for v in labels),
                    **_shards_record(samples)},
        "temperature": float(cfg.temperature),
        "topk": cfg.topk, "views": cfg.views, "num_classes": teacher.num_classes,
        "class_names": class_names,
        "embedding_dim": embedding_dim,
        # what ran (auto resolved): ssld verify recomputes with it, a resume must match it
        "compute": {"precision": precision, "decoder": decoder_name, "device": device.type,
                    "channels_last": cfg.channels_last, "compile": cfg.compile,
                    "batch_size": cfg.batch_size},
        "config": cfg.to_dict(),
    }
    if views_from is not None:  # compared on resume: the same reference crops
        attrs["views_from"] = views_from
    if records is not None:  # compared on resume too: the same records
        attrs["augment"] = records.attrs
    attrs["logits"] = cfg.store_logits  # create() records it (only when true)
    return attrs


def _spec_path(data: str) -> str:
    """``--data`` as recorded: a local path made absolute, a URL as given."""
    return str(data) if "://" in str(data) else os.path.abspath(data)


def _shards_record(samples: Samples) -> dict[str, Any]:
    """For shard data, what the store's rows were read from: each shard's name, size and
    stamp when listed, as one fingerprint (a resume with shards that changed since is
    refused: its rows would mix two versions of the data)."""
    shards = getattr(samples, "shards", None)
    if samples.tar is None or not shards:
        return {}
    return {"shards": len(shards), "shards_fingerprint": fingerprint(
        f"{shard.name}\t{shard.size}\t{shard.stamp}" for shard in shards)}


def _label_batch(forward, images, valid: np.ndarray, *, views: int, k: int, temperature: float,
                 autocast, channels_last: bool, embedding_dim: int | None, batch_size: int,
                 store_logits: bool = False) -> dict[str, np.ndarray]:
    """The arrays ``writer.write`` takes for one batch, as numpy: top-k ``indices`` (n, V, k),
    ``probs``, ``residual`` (n, V), view-0 ``embeddings`` and, with ``store_logits``, the
    top-k ``logits`` and ``log_partition``; invalid rows get "no information" (zero top-k
    mass, zero logits). The model sees at most ``batch_size`` images at a time."""
    import torch

    n = len(valid)
    out = {"indices": np.tile(np.arange(k, dtype=np.int64), (n, views, 1)),
           "probs": np.zeros((n, views, k), dtype=np.float32),
           "residual": np.ones((n, views), dtype=np.float32),
           "embeddings": np.zeros((n, embedding_dim), np.float32) if embedding_dim else None}
    if store_logits:
        out.update(logits=np.zeros((n, views, k), np.float32),
                   log_partition=np.zeros((n, views), np.float32))
    if images is None or not valid.any():
        return out
    x = images.reshape((views * n,) + tuple(images.shape[2:]))  # view-major rows v * n + i

    def label(part):
        if channels_last:
            part = part.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits, pooled = forward(part)
        top_i, top_p, rest = top_k(logits, k, temperature)
        top_l, log_z = top_logits(logits, top_i, temperature) if store_logits else (None, None)
        return top_i, top_p, rest, top_l, log_z, pooled

    top_i, top_p, rest, top_l, log_z, pooled = in_chunks(label, x, batch_size)
    computed = {"indices": top_i, "probs": top_p, "residual": rest}
    if store_logits:
        computed["logits"], computed["log_partition"] = top_l, log_z
    for name, value in computed.items():
        by_row = value.reshape((views, n) + tuple(value.shape[1:])).transpose(0, 1)
        out[name][valid] = by_row.cpu().numpy()[valid]
    if out["embeddings"] is not None:
        out["embeddings"][valid] = fit_float16(pooled[:n].float().cpu().numpy()[valid])
    return out


@dataclass
class LoopTotals:
    """What one rank's loop did; every rank's reaches rank 0 for the run's record."""

    images: int = 0
    failures: int = 0
    pending_failures: list[str] = field(default_factory=list)  # lines of a store on object storage
    clock: dict[str, float] = field(default_factory=lambda: {  # where the loop's time goes
        "wait_s": 0.0, "compute_s": 0.0, "store_s": 0.0})


def label_rows(decoded, label: Callable, writer, *, keys: list[str], out: str, rank: int,
               progress, keep_boxes: bool = False, tar: np.ndarray | None = None) -> LoopTotals:
    """The loop: for each decoded batch, the teacher's labels, the batch's failures on disk,
    then its rows in the store; ``writer`` is closed at the end (its last writes are the
    loop's time too). ``decoded`` yields ``(batch, images)``; ``label(images, valid)``
    returns the arrays ``writer.write`` takes. Failed rows' boxes are zeroed unless
    ``keep_boxes`` (``--views-from``: the reference's boxes, which a row mixing with a
    failed one still replays). ``tar``: every row's shard location, stored with its row
    (shard data)."""
    totals = LoopTotals()
    started = tick = time.perf_counter()
    for batch, images in decoded:
        got = time.perf_counter()
        labeled = label(images, batch.valid)
        computed = time.perf_counter()
        failed = np.flatnonzero(~batch.valid)
        boxes, flips = batch.boxes, batch.flips
        if not keep_boxes:  # boxes planned from an image that failed: meaningless
            boxes[failed], flips[failed] = 0, False  # the same rows for any decoder
        _append_failures(out, rank, [
            f"{keys[batch.start + i]}\t{batch.reasons[i] or 'unknown'}\n" for i in failed],
            totals.pending_failures)
        # records are drawn (or stored) without the image: a failed row keeps them
        records = {} if batch.records is None else batch.records.store_arrays(
            writer.augment_dims or {})
        if tar is not None:  # where each row's image lies: training reads it from there
            records["tar"] = tar[batch.start:batch.start + len(batch)]
        writer.write(batch.start, boxes=boxes, flips=flips, valid=batch.valid,
                     **{name: value for name, value in labeled.items() if value is not None},
                     **records)
        totals.images += len(batch)
        totals.failures += len(failed)
        progress.update(len(batch))
        totals.clock["wait_s"] += got - tick
        totals.clock["compute_s"] += computed - got
        tick = time.perf_counter()
        totals.clock["store_s"] += tick - computed
    writer.close()
    totals.clock["loop_s"] = time.perf_counter() - started
    return totals


def _rows(cfg: InferConfig, dist: Dist):
    """(cfg, samples, reference): the data source, listed once for every rank (files on rank
    0, shards by every rank in shares) — or, with ``--views-from``, the reference store's
    rows, root, views and boxes, its views and chunk size then the run's."""
    if cfg.views_from is None:
        return cfg, find_samples(cfg.data, root=cfg.root, source=cfg.source, dist=dist,
                                 progress=cfg.progress), None
    from .reference import load_reference

    reference = dist.on_main(lambda: load_reference(
        cfg.views_from, data=cfg.data, root=cfg.root, source=cfg.source, views=cfg.views,
        box_convention=BOX_CONVENTION))
    cfg = dataclasses.replace(cfg, views=reference.views,
                              chunk_rows=cfg.chunk_rows or reference.chunk_rows)
    return cfg, reference.samples, reference


def _view_spec(cfg: InferConfig, data_config: dict[str, Any], reference) -> ViewSpec:
    """How the views are drawn: from the teacher's preprocessing, and with a reference store
    the crop parameters it recorded (its boxes are replayed, never drawn here)."""
    spec = data_config_view_spec(cfg, data_config)
    if reference is None:
        return spec
    drawn = reference.preprocessing
    return dataclasses.replace(
        spec, crop_scale=tuple(drawn.get("crop_scale", spec.crop_scale)),
        crop_ratio=tuple(drawn.get("crop_ratio", spec.crop_ratio)),
        flip_prob=float(drawn.get("flip_prob", spec.flip_prob)),
        seed=int(drawn.get("seed", spec.seed)))


def data_path(cfg: InferConfig, dist: Dist, samples: Samples, spec: ViewSpec,
               data_config: dict[str, Any], decoder_class: type, batches: list[list[int]],
               device, planned, augment=None):
    """(loader, decoder, workers): the DataLoader of this rank's batches and the decoder that
    turns them into model input (None when no batch is left: a finished store); with
    ``augment`` (an ``imaging.augment.source.Augmentation``) the views get its records."""
    import torch

    from .imaging.decode import ViewDataset, collate

    cpus = cpus_per_rank(dist)
    workers = (cfg.num_workers if cfg.num_workers is not None
               else decoder_class.default_workers(cpus))
    dataset = ViewDataset(ImageSource(samples.root), samples.keys, spec,
                          data_config["interpolation"], mode=decoder_class.worker_mode,
                          planned=planned, augment=augment, tar=samples.tar)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    decoder = None
    if batches:  # building a decoder can cost seconds (DALI's pipeline)
        decoder = decoder_class(spec=spec, interpolation=data_config["interpolation"],
                                mean=data_config["mean"], std=data_config["std"],
                                max_batch=max(len(b) for b in batches), device=device,
                                num_threads=max(1, cpus - workers), augment=augment)
    return loader, decoder, workers


def _run(cfg: InferConfig, dist: Dist, device, started: float) -> RunSummary:
    import torch

    import labelstore

    from .imaging.decode import batch_ranges
    from .model import load_teacher

    decoder_class = resolve_decoder(cfg.decoder, device)
    cfg, samples, reference = _rows(cfg, dist)
    check_augmentation(cfg, len(samples))
    teacher = load_teacher(cfg, device)
    labels, class_names = _labels_and_names(samples, teacher.num_classes, cfg.class_names,
                                            cfg.checkpoint)
    if cfg.topk > teacher.num_classes:
        raise ValueError(f"--topk {cfg.topk} exceeds the model's {teacher.num_classes} classes")
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
    spec = _view_spec(cfg, teacher.data_config, reference)
    embedding_dim = _embedding_dim(teacher.model, spec, device) if cfg.embeddings else None
    records = _records(cfg, reference, teacher.data_config)
    attrs = _store_attrs(cfg, samples, labels, teacher, spec, class_names, embedding_dim,
                         decoder_class.name, device, precision,
                         reference and reference.record, records)
    plan: Plan = dist.on_main(lambda: _open_or_create(
        cfg, samples, labels, attrs, teacher.num_classes, embedding_dim, records))
    dist.barrier()  # the store exists before any rank writes
    writer = labelstore.open(cfg.out, mode="a")

    # Whole chunks of rank 0's plan, round-robin: never re-read from the store here, where
    # another rank may already have finished a chunk.
    batches = batch_ranges([writer.chunk_range(c) for c in plan.chunks_of(dist)],
                           cfg.batch_size, cfg.views)
    loader, decoder, workers = data_path(cfg, dist, samples, spec, teacher.data_config,
                                          decoder_class, batches, device,
                                          reference and reference.planned,
                                          records and records.for_store(samples, spec,
                                                                        writer.chunk_rows))
    label = functools.partial(
        _label_batch, make_forward(teacher.model, cfg.embeddings, cfg.compile),
        views=cfg.views, k=cfg.topk, temperature=cfg.temperature,
        autocast=autocast(precision, device), channels_last=cfg.channels_last,
        embedding_dim=embedding_dim, batch_size=cfg.batch_size, store_logits=cfg.store_logits)
    progress = progress_bar(dist.is_main and cfg.progress, sum(len(b) for b in batches),
                            "infer-teacher", unit="img", unit_scale=False, leave=True,
                            mininterval=1.0)
    with torch.inference_mode(), progress:
        totals = label_rows(decoder.decode(iter(loader)) if decoder is not None else (),
                            label, writer, keys=samples.keys, out=cfg.out, rank=dist.rank,
                            tar=samples.tar,
                            progress=progress,
                            keep_boxes=reference is not None and reference.augmented)
    every_rank = dist.gather(totals)
    dist.barrier()  # every rank's chunks are written
    return dist.on_main(lambda: _finish(
        cfg, dist, every_rank, started=started, plan=plan, decoder_name=decoder_class.name,
        device=device, details={"dali_rebuilds": getattr(decoder, "rebuilds", 0),
                                "num_workers": workers}))


def _finish(cfg: InferConfig, dist: Dist, totals: list[LoopTotals], *, started: float,
            plan: Plan, decoder_name: str, device, details: dict) -> RunSummary:
    """Rank 0, after every rank is done: failed.txt, completeness, the run's record.
    Raises IncompleteRunError when chunks of the plan are still missing."""
    import labelstore

    store = labelstore.open(cfg.out)
    writer = labelstore.open(cfg.out, mode="a")
    done = writer.done_chunks()
    rows_done = np.zeros(len(store), dtype=bool)
    for chunk in np.flatnonzero(done):
        lo, hi = writer.chunk_range(int(chunk))
        rows_done[lo:hi] = True
    total_failures = _merge_failures(cfg.out, list(store.keys), rows_done & ~store.valid,
                                     [line for t in totals for line in t.pending_failures])
    missing = store.missing()
    skipped, resumed = plan.skipped, plan.resumed
    wall = time.perf_counter() - started
    slowest = max(totals, key=lambda t: t.clock["loop_s"]).clock  # the rank that finished last
    details = {**details, **{k: round(v, 3) for k, v in slowest.items()}}
    record = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "wall_s": round(wall, 3), "images": sum(t.images for t in totals),
              "failures": sum(t.failures for t in totals), "world_size": dist.world_size,
              "device": device.type, "decoder": decoder_name, "resumed": resumed, **details}
    unwritten = [c for c in plan.todo if not done[c]]
    if unwritten:
        record["incomplete_chunks"] = len(unwritten)
    writer.update_attrs(complete=not missing, failures=total_failures,
                        runs=list(store.attrs.get("runs") or []) + [record])
    if unwritten:
        first = writer.chunk_range(unwritten[0])
        raise IncompleteRunError(
            f"incomplete: {len(unwritten)} chunks missing from {cfg.out} after this run (first: "
            f"chunk {unwritten[0]}, rows {first[0]}:{first[1]}); rerun the same command to "
            "resume")
    return RunSummary(out=cfg.out, images=record["images"], failures=record["failures"],
                      skipped=skipped, total_failures=total_failures, wall_s=wall,
                      loop_s=slowest["loop_s"], store_bytes=disk_bytes(cfg.out),
                      complete=not missing, decoder=decoder_name, device=device.type,
                      world_size=dist.world_size, details=details)
