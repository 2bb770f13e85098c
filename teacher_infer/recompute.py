"""The teacher half of ``ssld verify``: recompute sampled rows and compare with the store.

The teacher (model, weights, class count), preprocessing (input size, interpolation,
mean, std, crop_pct), temperature, precision and decoder are the ones the store records;
the crops are the stored boxes and flips (views.PlannedViews), so nothing is redrawn.
For an ensemble store every member teacher is recomputed and combined with the recorded
rule and weights from its own top-k, as ``labelstore.ensemble`` did. See
labelstore/_verify.py for what "agree" means.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import labelstore
from labelstore import (LabelStore, TeacherCheck, VerifyResult, combine_distributions, densify,
                        quantize_boxes)

from .config import VERIFY_SAMPLE, VERIFY_SEED, InferConfig
from .images import ImageSource, root_problem
from .imaging.decode import DecodeError, decode_rgb, image_bytes
from .imaging.views import PlannedViews, ViewSpec
from .roots import check_image_root


WORST_SHOWN = 5   # worst rows listed


def verify(store: Any, *, sample: int = VERIFY_SAMPLE,
           checkpoint: Sequence[str] | str | None = None,
           seed: int = VERIFY_SEED, root: str | None = None, device: str = "auto",
           decoder: str | None = None, atol: float | None = None,
           min_agreement: float | None = None, batch_size: int | None = None,
           threads: int | None = None, num_workers: int = 0) -> VerifyResult:
    """``labelstore.verify`` (the structure), then ``sample`` random rows (drawn with
    ``seed``; all of them in a smaller store) recomputed with the recorded teacher(s): each
    row with the teacher of its row range (``LabelStore.row_teachers``).

    ``checkpoint`` replaces the recorded weights (one file per teacher, in the order of the
    row ranges and, within an ensemble, of its members), ``root`` the recorded dataset root,
    ``decoder`` the recorded decoder; ``atol`` / ``min_agreement`` default to labelstore's
    documented tolerances; ``threads`` are the CPU threads (None: the CPUs per rank),
    ``num_workers`` the decoding processes (0: in this process, enough for the default
    sample). The options are checked against the store before any chunk is read.
    Augmentation records are checked first (``augment.check_store_records``, every row) and
    the sampled rows recomputed with them applied, partners included. The teacher part is
    skipped when the structure check found the store damaged, or its records cannot be
    replayed.
    """
    from .runtime import set_threads

    if int(sample) < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")
    if int(num_workers) < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    set_threads(threads)
    tolerances = {k: v for k, v in (("atol", atol), ("min_agreement", min_agreement))
                  if v is not None}
    try:
        opened = store if isinstance(store, LabelStore) else labelstore.open(store)
    except labelstore.DamagedStoreError:
        return labelstore.verify(store, **tolerances)   # reported as the failed structure
    plan = plan_teachers(opened, checkpoint, root)   # the options, before any data
    result = labelstore.verify(opened, **tolerances)
    if any(problem.startswith(("damaged", "label store")) for problem in result.problems):
        return result
    from .imaging.augment import check_store_records

    problem = check_store_records(opened)
    if problem:  # records that cannot be replayed: no views to recompute
        result.problems.append(f"augmentation records: {problem}")
        return result
    result.teacher = check_teacher(opened, plan, sample=int(sample), seed=seed, device=device,
                                   decoder=decoder, atol=result.atol, batch_size=batch_size,
                                   num_workers=int(num_workers))
    return result


@dataclass(frozen=True)
class TeacherRecord:
    """One teacher as a store records it (a plain store has one, an ensemble several)."""

    teacher: dict[str, Any]
    preprocessing: dict[str, Any]
    temperature: float
    topk: int
    precision: str
    decoder: str | None
    batch_size: int | None


def teacher_records(entry: dict[str, Any], topk: int
                    ) -> tuple[list[TeacherRecord], list[float], str | None]:
    """The teachers of one row range (``entry``: the attributes ``LabelStore.row_teachers``
    gives), the ensemble weights and rule (None for a plain teacher); ``topk`` the store's."""
    teacher = entry.get("teacher") or {}
    if "members" in teacher:
        records = [TeacherRecord(m.get("teacher") or {}, m.get("preprocessing") or {},
                                 float(m.get("temperature", 1.0)), int(m["topk"]),
                                 m.get("precision") or "fp32", m.get("decoder"),
                                 m.get("batch_size"))
                   for m in teacher["members"]]
        return records, list(teacher["weights"]), teacher["rule"]
    compute = entry.get("compute") or {}
    return [TeacherRecord(teacher, entry.get("preprocessing") or {},
                          float(entry.get("temperature", 1.0)), topk,
                          compute.get("precision") or "fp32", compute.get("decoder"),
                          compute.get("batch_size"))], [1.0], None


@dataclass
class RangePlan:
    """The rows [lo, hi) of one teacher and what recomputes them."""

    lo: int
    hi: int
    records: list[TeacherRecord]
    weights: list[float]
    rule: str | None
    configs: list[InferConfig]
    checkpoints: list[str | None]


@dataclass
class TeacherPlan:
    """What ``check_teacher`` recomputes: the image root and each row range's teachers."""

    root: str
    ranges: list[RangePlan]


def plan_teachers(store: LabelStore, checkpoint: Sequence[str] | str | None,
                  root: str | None) -> TeacherPlan:
    """The options checked against the store, reading no chunk but a sample of its keys:
    ``--checkpoint`` one per teacher, each recorded teacher recomputable (model,
    preprocessing, weights here), ``--root`` (or the recorded root) holding the keys."""
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else \
        list(checkpoint or [])
    ranges = [(lo, hi, *teacher_records(entry, store.topk))
              for lo, hi, entry in store.row_teachers()]
    count = sum(len(records) for _, _, records, _, _ in ranges)
    if checkpoints and len(checkpoints) != count:
        raise ValueError(f"{store.path} has {count} teacher(s); got {len(checkpoints)} "
                         "--checkpoint (one per teacher, in the order of its row ranges and "
                         "ensemble members)")
    image_root = root or (store.attrs.get("dataset") or {}).get("root")
    if not image_root:
        raise ValueError(f"{store.path} records no dataset.root: pass --root with the folder "
                         "its keys are relative to")
    # before the teacher is loaded: a wrong root is one line, not every row "not decodable"
    check_image_root(str(image_root), store, option="--root", given=root is not None)
    plans, given = [], iter(checkpoints)
    for lo, hi, records, weights, rule in ranges:
        chosen = [next(given) if checkpoints else None for _ in records]
        plans.append(RangePlan(lo, hi, records, weights, rule,
                               [_config(record, file, str(image_root))
                                for record, file in zip(records, chosen)], chosen))
    return TeacherPlan(str(image_root), plans)


def _config(record: TeacherRecord, checkpoint: str | None, root: str) -> InferConfig:
    """An InferConfig that loads the recorded teacher with its preprocessing."""
    teacher, pre = record.teacher, record.preprocessing
    if not teacher.get("model") or not pre.get("input_size"):
        raise ValueError("the store records no teacher model or preprocessing to recompute "
                         "with (use --structure-only)")
    weights = str(teacher.get("weights") or "")
    seed = int(pre.get("seed", 0))
    random_seed = re.fullmatch(r"random\(seed=(-?\d+)\)", weights)
    if random_seed:
        seed = int(random_seed.group(1))
    if checkpoint is None and weights == "checkpoint":
        checkpoint = teacher.get("checkpoint")
        if not checkpoint or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"the teacher's checkpoint {checkpoint} is not here; pass "
                                    "--checkpoint FILE")
    _, height, width = (int(v) for v in pre["input_size"])
    if height != width:
        raise ValueError(f"recorded input size {height}x{width} is not square; cannot recompute")
    return InferConfig(
        model=teacher["model"], data=root, out="-", checkpoint=checkpoint,
        pretrained=checkpoint is None and weights == "pretrained",
        random_weights=checkpoint is None and bool(random_seed),
        num_classes=teacher.get("num_classes"), seed=seed, input_size=height,
        interpolation=pre.get("interpolation"), mean=pre.get("mean"), std=pre.get("std"),
        crop_pct=pre.get("crop_pct"), views=int(pre.get("views", 1)), progress=False)


def recompute(record: TeacherRecord, cfg: InferConfig, *, images: ImageSource, keys: list[str],
              planned: PlannedViews, device_name: str, decoder: str | None,
              batch_size: int, augment=None, tar: np.ndarray | None = None,
              num_workers: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Full softmax (n, V, C) of the rows ``keys`` (read from ``images``, with their
    ``tar`` rows when in shards) at the planned views (with ``augment``, an
    ``imaging.augment.source.Augmentation``: their stored records applied, partners
    included), their validity and notes."""
    import torch

    from .imaging.decode import ViewDataset, batch_ranges, collate
    from .infer import in_chunks
    from .imaging.decoders import decoder_class, resolve_decoder
    from .model import load_teacher
    from .runtime import Dist, allow_tf32, autocast, resolve_device

    notes = []
    device = resolve_device(device_name, Dist.from_env())
    allow_tf32(device)  # fp32 means what it meant in the teacher pass
    wanted = decoder or record.decoder or "pil"
    if decoder is None and wanted != "pil" and decoder_class(wanted).unavailable() is not None:
        notes.append(f"the store was decoded with {wanted}, which is not available here: PIL here")
        wanted = "pil"
    decoder_cls = resolve_decoder(wanted, device)
    precision = record.precision
    if precision == "fp16" and device.type != "cuda":
        notes.append("the store was computed in fp16 on CUDA; bf16 here")
        precision = "bf16"
    teacher = load_teacher(cfg, device)
    pre = record.preprocessing
    views = planned.boxes.shape[1]
    spec = ViewSpec(views=views, input_size=(cfg.input_size, cfg.input_size),
                    crop_pct=float(teacher.data_config["crop_pct"]),
                    crop_mode=pre.get("crop_mode") or "center")
    interpolation = teacher.data_config["interpolation"]
    dataset = ViewDataset(images, keys, spec, interpolation, mode=decoder_cls.worker_mode,
                          planned=planned, augment=augment, tar=tar)
    batches = batch_ranges([(0, len(keys))], batch_size, views)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                         num_workers=num_workers, collate_fn=collate)
    decoder_run = decoder_cls(spec=spec, interpolation=interpolation,
                              mean=teacher.data_config["mean"], std=teacher.data_config["std"],
                              max_batch=max(len(b) for b in batches), device=device,
                              num_threads=max(1, os.cpu_count() or 1), augment=augment)
    probs = np.zeros((len(keys), views, teacher.num_classes), dtype=np.float32)
    valid = np.zeros(len(keys), dtype=bool)
    with torch.inference_mode():
        for batch, images in decoder_run.decode(iter(loader)):
            rows = slice(batch.start, batch.start + len(batch))
            valid[rows] = batch.valid
            if images is None or not batch.valid.any():
                continue
            n = len(batch)

            def softmax(part):
                with autocast(precision, device):
                    logits = teacher.model(part)
                return (torch.softmax(logits.float() / record.temperature, dim=-1),)

            out, = in_chunks(softmax, images.reshape((views * n,) + tuple(images.shape[2:])),
                             batch_size)
            probs[rows] = out.view(views, n, -1).transpose(0, 1).cpu().numpy()
    return probs, valid, notes


def _member_dense(probs: np.ndarray, k: int) -> np.ndarray:
    """What a member store holds of full softmax rows (n, C): top-k + marginal smoothing."""
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(probs, indices, axis=1)
    residual = np.clip(1.0 - values.astype(np.float64).sum(axis=1), 0.0, 1.0)
    return densify(indices, values.astype(np.float16), residual.astype(np.float32),
                   probs.shape[1])


def check_teacher(store: LabelStore, plan: TeacherPlan, *, sample: int, seed: int,
                  device: str, decoder: str | None, atol: float, batch_size: int | None,
                  num_workers: int = 0) -> TeacherCheck:
    """Recompute ``sample`` random rows of ``store``, each with the teacher of its row range
    (``plan``, from :func:`plan_teachers`), and compare them with the stored top-k."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), size=min(sample, len(store)), replace=False))
    stored = store.read(rows)
    keys = [str(key) for key in store.keys[rows]]
    images = ImageSource(plan.root)   # files, or the rows' shard byte ranges
    tar = store.read_tar(rows) if store.tar_fields else None
    expected = np.zeros(stored.probs.shape[:2] + (store.num_classes,), dtype=np.float64)
    notes, now_valid = [], np.ones(len(rows), dtype=bool)
    augment = None
    if store.augment_dims:  # the stored records, partners included, on the sampled rows
        from .imaging.augment.source import StoredAugmentation

        augment = StoredAugmentation(store, images, rows=rows)
    for part in plan.ranges:
        picked = np.flatnonzero((rows >= part.lo) & (rows < part.hi))
        if not len(picked):
            continue
        planned = PlannedViews(boxes=quantize_boxes(stored.boxes[picked]),
                               flips=stored.flips[picked], usable=stored.valid[picked],
                               reason="invalid in the store")
        members = []
        for record, cfg, file in zip(part.records, part.configs, part.checkpoints):
            recorded_sha = record.teacher.get("checkpoint_sha256")
            if file is not None and recorded_sha:
                from .model import sha256_file
                if sha256_file(file) != recorded_sha:
                    notes.append(f"--checkpoint {file} is not the file the store was "
                                 "computed with (sha256 differs)")
            probs, valid, more = recompute(record, cfg, images=images,
                                           keys=[keys[i] for i in picked], planned=planned,
                                           device_name=device, decoder=decoder,
                                           batch_size=batch_size or record.batch_size or 32,
                                           augment=None if augment is None else
                                           StoredAugmentation(store, images,
                                                              rows=rows[picked]),
                                           tar=None if tar is None else tar[picked],
                                           num_workers=num_workers)
            notes += [note for note in more if note not in notes]
            members.append((probs, record.topk))
            now_valid[picked] &= valid
        expected[picked] = _expected(members, part.weights, part.rule)
    # Rows invalid in the store were not cropped (no boxes): does the image decode now, and,
    # with stored records, the images of its mixing partners (without them it fails too)?
    for i in np.flatnonzero(~stored.valid):
        wanted = [(keys[i], None if tar is None else tar[i])]
        if augment is not None:
            from .imaging.augment import partner_views

            wanted += [(partner.key, partner.tar) for partner in
                       map(augment.partner, partner_views(augment.records(i)))]
        try:
            for key, where in wanted:
                decode_rgb(image_bytes(images, key, where))
        except DecodeError:
            continue
        now_valid[i] = True
    return _compare(store, rows, keys, stored, expected, now_valid, atol, notes,
                    time.perf_counter() - started)


def _expected(members, weights, rule) -> np.ndarray:
    """(n, V, C) distributions the store should hold (an ensemble: combined like ensemble)."""
    if rule is None:
        return members[0][0]
    probs0 = members[0][0]
    out = np.zeros(probs0.shape, dtype=np.float64)
    for view in range(probs0.shape[1]):
        dense = [_member_dense(probs[:, view], k) for probs, k in members]
        out[:, view] = combine_distributions(dense, weights, rule)
    return out


def _compare(store, rows, keys, stored, expected, now_valid, atol, notes,
             seconds) -> TeacherCheck:
    both = stored.valid & now_valid
    mismatched = int((stored.valid != now_valid).sum())
    recomputed_at_stored = np.take_along_axis(expected, stored.indices, axis=-1)
    diff = np.abs(recomputed_at_stored - stored.probs)[both]          # (m, V, k)
    best = expected.argmax(-1)[both]                                  # (m, V)
    stored_top1 = stored.indices[..., 0][both]
    top1_equal = best == stored_top1
    near_tie = expected.max(-1)[both] - recomputed_at_stored[..., 0][both] <= atol
    max_diff = diff.max(-1) if diff.size else np.zeros((0, stored.probs.shape[1]))
    agree = (top1_equal | near_tie) & (max_diff <= atol)
    worst = []
    local = np.flatnonzero(both)
    if len(local):
        score = np.where(agree, 0.0, 1.0) + max_diff                  # disagreeing first
        for flat in np.argsort(-score, axis=None)[:WORST_SHOWN]:
            i, view = np.unravel_index(flat, score.shape)
            if agree[i, view]:
                break
            row = local[i]
            worst.append(f"row {int(rows[row])} ({keys[row]}) view {int(view)}: stored top-1 "
                         f"{int(stored_top1[i, view])} (p {stored.probs[row, view, 0]:.4f}), "
                         f"recomputed {int(best[i, view])} "
                         f"(p {expected[row, view].max():.4f}), max |Δp| "
                         f"{max_diff[i, view]:.4f}")
    for row in np.flatnonzero(stored.valid != now_valid)[:WORST_SHOWN]:
        state = "valid in the store, cannot be decoded now" if stored.valid[row] else \
            "invalid in the store, but decodes now"
        worst.append(f"row {int(rows[row])} ({keys[row]}): {state}")
    return TeacherCheck(
        rows=len(rows), row_views=int(agree.size),
        top1_equal=float(top1_equal.mean()) if top1_equal.size else 1.0,
        max_abs_diff=float(max_diff.max()) if max_diff.size else 0.0,
        agreement=float(agree.mean()) if agree.size else 1.0,
        validity_mismatches=mismatched, worst=worst, notes=notes, seconds=seconds)
