"""The steps the Fashion-MNIST studies are built from, and the setting they share.

Each builder returns a ``driver.Step`` that runs one ``ssld`` command (``train_step``,
``eval_step``, ``infer_step``, ``inspect_step``) or a small internal function (``choose``, the
dedup threshold, the pseudo-label check), and reads the command's result from files and JSON
only, never from its printed text: ``metrics.csv`` / ``config.json`` of a run, the JSON that
``ssld eval --json`` and ``ssld inspect --json`` print (their stdout, kept in
``logs/STEP.out``), and the ``dedup`` output files. A study composes them into its protocol;
the driver (``driver.py``) runs them.
"""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Optional

from experiments import record
from experiments.driver import Context, Step, read_json

__all__ = ["DEV_SEED", "INPUT_SIZE", "MEASURED", "STUDENT", "TEACHER", "VIEWS", "choose",
           "collect_prepared", "collect_train", "count_dups", "dedup_steps", "dedup_threshold",
           "eval_step", "infer_step", "inspect_step", "list_hashes", "merge_steps", "per_class",
           "prepare_step", "pseudo_label_check", "read_eval", "read_list", "read_metrics",
           "runtime", "select_merge_steps", "select_steps", "ssld", "train_command",
           "train_step", "tune_steps", "write_list"]

TEACHER = "resnet10t"               # 4.9 M parameters, ~25 MMAC at 32 px
STUDENT = "mobilenetv3_small_050"   # 0.58 M parameters, the MobileNetV3 family of SSLD's claims
INPUT_SIZE = 32                     # Fashion-MNIST is 28x28 grey; everything is resized to 32x32
VIEWS = 4                           # stored teacher views per image: view 0 = eval crop + 3 random
DEV_SEED = 20240601                 # fixes the dev split (held out of L) and the smoke subsets

# Throughput measured on the 2-core development machine (1 torch thread, batch 128, 32 px, load
# average 2-3 from other users' jobs), 2026-11-28, with the ssld commands themselves: images/s.
MEASURED = dict(teacher_train=134, student_train=312, ssld_train=322, global_train=291,
                online_train=219, infer_4_views=111, infer_1_view=450, eval_student=731,
                eval_teacher=467, sift_pairs=10, startup_s=10.0, two_jobs_speedup=1.4)


# ----------------------------------------------------------------------------------------------
# list files and results


def read_list(path: Path) -> list[tuple[str, Optional[int]]]:
    """A PaddleClas list file as (key, label or None) pairs."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            rows.append((parts[0], int(parts[1])))
        else:
            rows.append((line.strip(), None))
    return rows


def write_list(path: Path, rows: list[tuple[str, Optional[int]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{key} {label}\n" if label is not None else f"{key}\n" for key, label in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def per_class(rows, count: Optional[int], rng: random.Random):
    """``count`` rows of every class (all when None), in the original order."""
    if count is None:
        return list(rows)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(rows):
        by_class.setdefault(label, []).append(i)
    keep = set()
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < count:
            raise SystemExit(f"class {label} has {len(idx)} images, fewer than {count}")
        keep.update(rng.sample(idx, count))
    return [row for i, row in enumerate(rows) if i in keep]


PREPARED_LISTS = ("labeled.txt", "pool.txt", "val.txt", "pool_labels.txt", "classes.txt")


def collect_prepared(ctx: Context) -> dict:
    """``prepare``'s meta.json, with hashes of the list files it wrote: the prepared data is
    recomputed every sitting, and these say it is the same data (keys, labels, the draw of L)."""
    return read_json(ctx.data / "meta.json") | {
        "sha256": {name: record.sha256_of(ctx.data / name) for name in PREPARED_LISTS}}


def list_hashes(ctx: Context, names) -> dict:
    """sha256 of the split list files (they hold relative keys: the same in any workdir)."""
    return {"sha256": {name: record.sha256_of(Path(ctx.split(name))) for name in names}}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _float(value: str) -> Optional[float]:
    return float(value) if value not in ("", None) else None


def read_eval(path: Path) -> dict:
    """The JSON object ``ssld eval --json`` printed (its stdout file, so that warnings on
    stderr cannot get in the way), with the exact counts of correct images: counts are what a
    recomputed evaluation is compared by (``record.differences``)."""
    report = json.loads(path.read_text())
    images = int(report["images"])
    return {"top1": report["top1"], "top5": report["top5"], "images": images,
            "top1_correct": round(report["top1"] * images),
            "top5_correct": round(report["top5"] * images)}


# ----------------------------------------------------------------------------------------------
# one ssld command each


def ssld(ctx: Context, *args: Any) -> list[str]:
    return [ctx.args.ssld, *[str(a) for a in args]]


def prepare_step() -> Step:
    """``ssld prepare fashion-mnist`` into the workdir's data folder, from ``--src`` where the
    study has that option (the Debian package's IDX folder) and it is given."""
    def command(ctx: Context) -> list[str]:
        src = getattr(ctx.args, "src", None)
        return ssld(ctx, "prepare", "fashion-mnist", "--out", ctx.data) + \
            (["--src", src] if src else [])

    return Step("prepare", "prepare", command=command,
                outputs=lambda c: [c.data / "meta.json"], collect=collect_prepared)


def runtime(ctx: Context) -> list[str]:
    return ["--device", ctx.args.device, "--num-workers", str(ctx.args.num_workers)]


def train_command(ctx: Context, run: str, *, model: str, epochs: int, lr: Optional[float],
                  wd: Optional[float], seed: int, warmup: Optional[float],
                  data: Optional[str] = None, stores: tuple[str, ...] = (),
                  val: Optional[str] = None, extra: tuple = ()) -> list[str]:
    """A train-student command; ``lr``/``wd``/``warmup`` None leave train-student's default."""
    cmd = ssld(ctx, "train-student", "--student", model, "--out", ctx.run_dir(run),
               "--input-size", INPUT_SIZE, "--epochs", epochs, "--batch-size",
               ctx.scale.batch_size)
    for flag, value in (("--lr", lr), ("--weight-decay", wd), ("--warmup-epochs", warmup)):
        if value is not None:
            cmd += [flag, f"{value:.6g}" if flag == "--warmup-epochs" else str(value)]
    cmd += ["--seed", str(seed), *runtime(ctx)]
    if data is not None:
        cmd += ["--data", data, "--root", str(ctx.images)]
    for store in stores:
        cmd += ["--store", store]
    if val is not None:
        cmd += ["--val", val, "--val-root", str(ctx.images)]
    return cmd + [str(a) for a in extra]


def collect_train(ctx: Context, run: str) -> dict:
    run_dir = ctx.run_dir(run)
    rows = read_metrics(run_dir)
    config = read_json(run_dir / "config.json")
    resolved = config.get("resolved", {})
    last = rows[-1] if rows else {}
    steps = int(resolved.get("steps_per_epoch", 0)) * int(config["epochs"])
    return {"run_dir": str(run_dir), "epochs": int(config["epochs"]),
            "num_train": resolved.get("num_train"),
            "steps": steps, "images_seen": steps * int(resolved.get("global_batch", 0)),
            "lr": config["lr"], "weight_decay": config["weight_decay"],
            "base_lr": resolved.get("base_lr"), "crop": resolved.get("crop"),
            "train_seconds": sum(float(r["epoch_s"]) for r in rows),
            "images_per_s": _float(last.get("images_per_s", "")),
            "last_train_loss": _float(last.get("train_loss", "")),
            "last_agreement": _float(last.get("agreement", "")),
            "dev_top1": _float(last.get("val_top1", "")),
            "store_top1": resolved.get("store_top1")}


def train_step(name: str, *, deps: tuple[str, ...], build: Callable[[Context], list[str]],
               group: str = "", exclusive: bool = False) -> Step:
    """A train-student run under ``runs/NAME``; finished = metrics.csv has every epoch."""
    def outputs(ctx: Context) -> list[Path]:
        return [ctx.run_dir(name) / "last.pt", ctx.run_dir(name) / "config.json"]

    def collect(ctx: Context) -> dict:
        result = collect_train(ctx, name)
        rows = read_metrics(ctx.run_dir(name))
        if not rows or int(rows[-1]["epoch"]) != result["epochs"]:
            raise RuntimeError(f"{ctx.run_dir(name)}/metrics.csv does not reach epoch "
                               f"{result['epochs']}")
        # a run killed between writing last.pt and its metrics row loses that row on resume
        result["metrics_rows_missing"] = result["epochs"] - len(rows)
        return result

    return Step(name=name, kind="train", deps=deps, command=build, collect=collect,
                outputs=outputs, resumable_train=Path(name), exclusive=exclusive, group=group)


def eval_step(name: str, run: str, model: str, *, data: str = "V", group: str = "") -> Step:
    """``ssld eval`` of ``runs/RUN/last.pt`` (the last epoch: no checkpoint is picked on V)."""
    def command(ctx: Context) -> list[str]:
        return ssld(ctx, "eval", "--model", model, "--checkpoint",
                    ctx.run_dir(run) / "last.pt", "--data", ctx.split(data), "--root",
                    ctx.images, "--batch-size", 256, *runtime(ctx), "--json")

    def collect(ctx: Context) -> dict:
        return read_eval(ctx.logs / f"{name}.out") | {"data": data, "run": run}

    return Step(name=name, kind="eval", deps=(run,), command=command, collect=collect,
                group=group, stdout=True)


def inspect_step(name: str, store: str, deps: tuple[str, ...]) -> Step:
    def command(ctx: Context) -> list[str]:
        return ssld(ctx, "inspect", ctx.store(store), "--json")

    def collect(ctx: Context) -> dict:
        report = json.loads((ctx.logs / f"{name}.out").read_text())
        if not report.get("complete"):
            raise RuntimeError(f"store {ctx.store(store)} is not complete")
        report.pop("missing", None)
        return report

    return Step(name=name, kind="inspect", deps=deps, command=command, collect=collect,
                stdout=True)


def infer_step(name: str, store: str, data: str, *, views: int | Callable[[Context], int],
               checkpoint: Callable[[Context], str], deps: tuple[str, ...],
               embeddings: bool = False, exclusive: bool = False,
               extra: tuple[str, ...] | Callable[[Context], tuple[str, ...]] = ()) -> Step:
    """``ssld infer-teacher`` of the teacher over a list file into STORE (resumes itself);
    ``extra``: more infer-teacher options, appended (e.g. augmentation records). ``views`` and
    ``extra`` may be functions of the context: settings that an earlier step chooses."""
    def command(ctx: Context) -> list[str]:
        n_views = views(ctx) if callable(views) else views
        more = extra(ctx) if callable(extra) else extra
        cmd = ssld(ctx, "infer-teacher", "--model", ctx.teacher, "--checkpoint", checkpoint(ctx),
                   "--num-classes", 10, "--class-names", ctx.data / "classes.txt",
                   "--data", ctx.split(data), "--root", ctx.images, "--out", ctx.store(store),
                   "--input-size", INPUT_SIZE, "--views", n_views, "--topk", 10, "--seed", 0,
                   "--batch-size", 256, "--no-progress", *runtime(ctx))
        if ctx.args.device != "cuda":
            cmd += ["--decoder", "pil"]
        return cmd + (["--embeddings"] if embeddings else []) + [str(a) for a in more]

    def collect(ctx: Context) -> dict:
        return {"store": ctx.store(store)}  # its contents: the inspect step's JSON

    return Step(name=name, kind="infer", deps=deps, command=command, collect=collect,
                outputs=lambda c: [Path(c.store(store))], exclusive=exclusive, group="teacher")


# ----------------------------------------------------------------------------------------------
# hyper-parameters, dedup, pseudo-labels


def tune_steps(add: Callable[[Step], None], prefix: str, model: str, grid, epochs: int,
               extra: Callable[[Context], dict], deps: tuple[str, ...]) -> list[str]:
    """A hyper-parameter grid on dev: one run per (lr, weight decay) of ``grid`` (seed 0,
    warmup one epoch, scored on the dev split) and the ``choose_PREFIX`` step that picks the
    best by last-epoch dev top-1. Both studies build their grids with it; returns the runs."""
    names = []
    for i, (lr, wd) in enumerate(grid):
        name = f"{prefix}_{i}"
        names.append(name)
        add(train_step(name, deps=deps, group="tuning",
                       build=lambda c, name=name, lr=lr, wd=wd: train_command(
                           c, name, model=model, epochs=epochs, lr=lr, wd=wd, seed=0,
                           warmup=1.0, val=c.split("dev"), **extra(c))))
    add(Step(f"choose_{prefix}", "choose", deps=tuple(names),
             internal=lambda c, names=tuple(names): choose(c, names)))
    return names


def choose(ctx: Context, names: tuple[str, ...]) -> dict:
    """The grid point with the best last-epoch top-1 on dev (ties: the first in grid order)."""
    scored = [(ctx.result(n)["dev_top1"], -i, n) for i, n in enumerate(names)]
    if any(s[0] is None for s in scored):
        raise RuntimeError(f"a tuning run has no dev top-1: {names}")
    best = max(scored)[2]
    r = ctx.result(best)
    return {"chosen": best, "lr": r["lr"], "weight_decay": r["weight_decay"],
            "run_dir": r["run_dir"],
            "grid": {n: {"lr": ctx.result(n)["lr"], "weight_decay": ctx.result(n)["weight_decay"],
                         "dev_top1": ctx.result(n)["dev_top1"]} for n in names}}


def count_dups(ctx: Context, path: Path, step: str = "") -> dict:
    """What ``ssld dedup`` wrote: its report ``OUT.rules.json`` (candidates, confirmed pairs,
    excluded pool images) and the pair list itself (``pool_key<TAB>query_key<TAB>cosine<TAB>
    inliers`` lines after ``#`` comments, the file select-topk --exclude reads), with a hash of
    its pair lines (the header names the stores' paths, so it is left out)."""
    report = read_json(Path(f"{path}.rules.json"))
    pairs = [ln.split("\t") for ln in path.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    return {"pairs": len(pairs), "pool_images": len({p[0] for p in pairs}),
            "val_images": len({p[1] for p in pairs if len(p) > 1}),
            "candidates": report["candidates"], "confirmed": report["confirmed"],
            "excluded_pool_images": report["excluded_pool_images"],
            "threshold": report["threshold"], "verify": report["verify"],
            "sha256": record.sha256_of(path, skip_comments=True), "file": str(path)}


def dedup_threshold(ctx: Context, path: Path) -> dict:
    """The stage-1 cosine that leaves at most ``dedup_max_pairs`` pairs for SIFT."""
    sc = ctx.scale
    cosines = sorted((float(ln.split("\t")[2]) for ln in path.read_text().splitlines()
                      if ln.strip() and not ln.startswith("#")), reverse=True)
    threshold = sc.dedup_threshold
    if len(cosines) > sc.dedup_max_pairs:
        # the file rounds to 4 decimals: step just below the boundary pair's printed value
        threshold = max(threshold, round(cosines[sc.dedup_max_pairs - 1] - 5e-5, 5))
    return {"threshold": threshold, "candidates": len(cosines),
            "verified": sum(1 for x in cosines if x >= threshold),
            "at_least": {str(t): sum(1 for x in cosines if x >= t)
                         for t in (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)}}


def dedup_steps(add: Callable[[Step], None], tag: str, pool_store: str, query_store: str,
                threshold: float) -> Callable[[Context], Path]:
    """Dedup of POOL_STORE against QUERY_STORE as study 1 does it: stage 1 (cosine of view 0's
    embeddings, ``threshold``, no verification) lists the candidates, ``dedup_threshold``
    raises the cosine until at most the scale's ``dedup_max_pairs`` remain, and stage 2
    verifies those with SIFT. Adds ``dedup_candidatesTAG``, ``choose_dedup_thresholdTAG`` and
    ``dedupTAG``; returns the duplicates list's path (``select-topk --exclude``)."""
    cands = lambda c: c.stores / f"{pool_store}_vs_{query_store}.candidates.tsv"  # noqa: E731
    dups = lambda c: c.stores / f"{pool_store}_vs_{query_store}.dups"  # noqa: E731
    add(Step(f"dedup_candidates{tag}", "dedup",
             deps=(f"inspect_{pool_store}", f"inspect_{query_store}"),
             command=lambda c: ssld(c, "dedup", "--query", c.store(query_store), "--pool",
                                    c.store(pool_store), "--out", cands(c), "--verify",
                                    "none", "--top-m", 1, "--threshold", threshold),
             outputs=lambda c: [cands(c)], collect=lambda c: count_dups(c, cands(c))))
    add(Step(f"choose_dedup_threshold{tag}", "choose", deps=(f"dedup_candidates{tag}",),
             internal=lambda c: dedup_threshold(c, cands(c))))
    add(Step(f"dedup{tag}", "dedup", deps=(f"choose_dedup_threshold{tag}",),
             command=lambda c: ssld(c, "dedup", "--query", c.store(query_store), "--pool",
                                    c.store(pool_store), "--out", dups(c), "--top-m", 1,
                                    "--threshold",
                                    c.result(f"choose_dedup_threshold{tag}")["threshold"]),
             outputs=lambda c: [dups(c)], collect=lambda c: count_dups(c, dups(c))))
    return dups


def select_steps(add: Callable[[Step], None], tag: str, pool_store: str,
                 k_of: Callable[[Context], int],
                 dedup: tuple[str, Callable[[Context], Path]]) -> str:
    """``select-topk`` on POOL_STORE (the duplicates of step ``dedup[0]``, listed in
    ``dedup[1]``, excluded; the selection's list file ``stores/SEL.txt`` beside its store) and
    its inspect. Returns the selection's store name, ``POOL_STORE_TAG``."""
    sel = f"{pool_store}_{tag}"
    add(Step(f"select_{sel}", "select", deps=(dedup[0], f"inspect_{pool_store}"),
             command=lambda c: ssld(
                 c, "select-topk", "--store", c.store(pool_store), "--k", k_of(c),
                 "--exclude", dedup[1](c), "--out", c.store(sel), "--list-out",
                 c.stores / f"{sel}.txt"),
             outputs=lambda c: [Path(c.store(sel)), c.stores / f"{sel}.txt"],
             rerun_flag="--overwrite"))
    add(inspect_step(f"inspect_{sel}", sel, (f"select_{sel}",)))
    return sel


def merge_steps(add: Callable[[Step], None], first: str | Callable[[Context], str],
                second: str, deps: tuple[str, ...], out: Optional[str] = None) -> str:
    """``merge`` of two stores (FIRST's rows first) into OUT (default ``FIRST+SECOND``), and
    its inspect; ``deps``: the steps that finish them. FIRST may be a function of the context
    (a store an earlier step chooses; then OUT is required). Returns the merged store's name."""
    if out is None and callable(first):
        raise ValueError("merge_steps: a chosen first store needs a fixed output name (out)")
    merged = out or f"{first}+{second}"
    add(Step(f"merge_{merged}", "merge", deps=deps,
             command=lambda c: ssld(c, "merge", c.store(first(c) if callable(first) else first),
                                    c.store(second), "--out", c.store(merged)),
             outputs=lambda c: [Path(c.store(merged))], rerun_flag="--overwrite"))
    add(inspect_step(f"inspect_{merged}", merged, (f"merge_{merged}",)))
    return merged


def select_merge_steps(add: Callable[[Step], None], tag: str, pool_store: str,
                       labeled_store: str, k_of: Callable[[Context], int],
                       dedup: tuple[str, Callable[[Context], Path]]) -> str:
    """``select_steps`` on POOL_STORE, then ``merge_steps`` of LABELED_STORE with the
    selection. Returns the merged store's name."""
    sel = select_steps(add, tag, pool_store, k_of, dedup)
    return merge_steps(add, labeled_store, sel, (f"select_{sel}", f"inspect_{labeled_store}"))


def pseudo_label_check(ctx: Context, selections: list[str]) -> dict:
    """Report only: how often the teacher's top-1 of a selected pool image is its hidden label."""
    hidden = dict(read_list(Path(ctx.split("U_hidden"))))
    out = {}
    for sel in selections:
        rows = read_list(ctx.stores / f"{sel}.txt")
        right = sum(1 for key, top1 in rows if hidden.get(key) == top1)
        out[sel] = {"rows": len(rows), "top1_correct": right,
                    "precision": right / len(rows) if rows else None}
    return out
