#!/usr/bin/env python3
"""The SSLD ablation table, reproduced in miniature on Fashion-MNIST (issue 6).

One driver for the whole protocol of ``experiments/fashion_mnist/README.md``. Every step is a
subprocess call of the public ``ssld`` console script (prepare, train-student, infer-teacher,
dedup, select-topk, merge, eval, inspect), so anyone can rerun any single step by hand: the exact
command of every step is in its log (``WORKDIR/logs/STEP.log``) and in the results JSON.

    python experiments/fashion_mnist/run.py --workdir /data/fm --scale full
    python experiments/fashion_mnist/report.py --results experiments/fashion_mnist/results/full.json

Resumable: a step that finished (its state file ``WORKDIR/state/STEP.json`` says so and its
outputs exist) is skipped; an interrupted training run continues with ``--resume`` from its
``last.pt``; an interrupted ``infer-teacher`` store resumes itself (same command); select/merge/
dedup simply run again. Run the same command again to continue after a crash or a time limit.
When the workdir is gone (a new machine), the results JSON is the record to resume from:
``record.py`` says which recorded steps are reused and which are recomputed and checked.

The driver reads files and JSON only, never a command's printed summary: list files it writes
(the dev split, the smoke subsets), ``metrics.csv`` / ``config.json`` of runs, the JSON that
``ssld eval --json`` and ``ssld inspect --json`` print (their stdout, kept in
``logs/STEP.out``), and the ``dedup`` output files (the pair list and its ``.rules.json``).
The hidden pool labels are read once, at the end, to report how often the teacher's
pseudo-label of a *selected* pool image is right (never used to choose anything).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def _load_record():
    """``record.py`` beside this file (this driver is a script, and study 2 loads it by path)."""
    import importlib.util

    name = "fashion_mnist_record"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "record.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


record = _load_record()

TEACHER = "resnet10t"               # 4.9 M parameters, ~25 MMAC at 32 px
STUDENT = "mobilenetv3_small_050"   # 0.58 M parameters, the MobileNetV3 family of SSLD's claims
INPUT_SIZE = 32                     # Fashion-MNIST is 28x28 grey; everything is resized to 32x32
VIEWS = 4                           # stored teacher views per image: view 0 = eval crop + 3 random
DEV_SEED = 20240601                 # fixes the dev split (held out of L) and the smoke subsets


@dataclass(frozen=True)
class Scale:
    """Sizes of one protocol run. ``None`` means "all of it"."""

    labeled_per_class: Optional[int]  # L: images per class used (of the prepared 600)
    dev_per_class: int                # dev split: held out of L for hyper-parameter choice only
    pool_size: Optional[int]          # U: pool images used (of 54,000)
    val_per_class: Optional[int]      # V: test images per class used (of 1,000)
    teacher_epochs: int
    student_epochs: int               # THE budget: every student row sees student_epochs x |L|
    batch_size: int                   # images (epochs x images seen rescaled for bigger sets)
    ks: tuple[int, ...]               # select-topk K (per class) for the L + selected-U rows
    k_main: int                       # the declared main K (3 seeds, ablations, fine-tune)
    finetune_epochs: int
    teacher_grid: tuple[tuple[float, float], ...]  # (lr per 256 images, weight decay)
    student_grid: tuple[tuple[float, float], ...]  # for the label-only and the SSLD students
    seeds: tuple[int, ...] = (0, 1, 2)
    dedup_threshold: float = 0.8      # ssld dedup's default cosine: the stage-1 floor
    dedup_max_pairs: int = 2000       # most similar (test, pool) pairs verified by SIFT


SCALES = {
    # a few hundred images, 1-2 epochs: proves the driver and every command run end to end.
    # Its numbers show nothing about the method.
    "smoke": Scale(labeled_per_class=30, dev_per_class=3, pool_size=600, val_per_class=50,
                   teacher_epochs=2, student_epochs=2, batch_size=32, ks=(10, 30), k_main=10,
                   finetune_epochs=1, teacher_grid=((0.1, 5e-4), (0.4, 5e-4)),
                   student_grid=((0.1, 5e-5), (0.4, 5e-5)), dedup_max_pairs=100),
    # the study: sized for <= 3 h of the 2-core development machine (README, "Run time")
    "full": Scale(labeled_per_class=None, dev_per_class=60, pool_size=None, val_per_class=None,
                  teacher_epochs=15, student_epochs=16, batch_size=128, ks=(1000, 3000),
                  k_main=1000, finetune_epochs=3, teacher_grid=((0.1, 5e-4), (0.4, 5e-4)),
                  student_grid=((0.1, 5e-5), (0.4, 5e-5))),
}


# Throughput measured on the 2-core development machine (1 torch thread, batch 128, 32 px, load
# average 2-3 from other users' jobs), 2026-11-28, with the ssld commands themselves: images/s.
MEASURED = dict(teacher_train=134, student_train=312, ssld_train=322, global_train=291,
                online_train=219, infer_4_views=111, infer_1_view=450, eval_student=731,
                eval_teacher=467, sift_pairs=10, startup_s=10.0, two_jobs_speedup=1.4)


def estimate(sc: Scale, steps: list["Step"], L: int = 6000, U: int = 54000,
             V: int = 10000) -> dict[str, float]:
    """Seconds per part of the protocol at the MEASURED rates, one step at a time; ``steps``
    (``build_steps``) gives the number of ``ssld`` processes and of student evaluations."""
    m = MEASURED
    L = 10 * sc.labeled_per_class if sc.labeled_per_class else L
    U = sc.pool_size or U
    V = 10 * sc.val_per_class if sc.val_per_class else V
    dev, ltrain = 10 * sc.dev_per_class, L - 10 * sc.dev_per_class
    Et, Es, n_seeds = sc.teacher_epochs, sc.student_epochs, len(sc.seeds)
    budget = Es * L
    main_set = L + min(10 * sc.k_main, U)
    students = {  # (images trained, images/s) per student row
        "label-only": (n_seeds * budget, m["student_train"]),
        "SSLD on L": (n_seeds * budget, m["ssld_train"]),
        "L + selected U": ((n_seeds + len(sc.ks) - 1) * budget, m["ssld_train"]),
        "same epochs (more steps)": (Es * main_set, m["ssld_train"]),
        "label-only on L, those steps": (Es * main_set, m["student_train"]),
        "SSLD on L, those steps": (Es * main_set, m["ssld_train"]),
        "L + all U": (budget, m["ssld_train"]),
        "losses": ((2 + n_seeds) * budget, m["ssld_train"]),
        "global views": (budget, m["global_train"]),
        "online teacher": (budget, m["online_train"]),
        "fine-tune": (sc.finetune_epochs * L, m["ssld_train"])}
    n_processes = sum(step.command is not None for step in steps)
    n_student_evals = sum(step.kind == "eval" and "teacher" not in step.name for step in steps)
    g_t, g_s = len(sc.teacher_grid), len(sc.student_grid)
    parts = {
        "tuning teacher": g_t * (Et * ltrain / m["teacher_train"] + Et * dev / m["eval_teacher"]),
        "tuning students": 2 * g_s * (Es * ltrain / m["student_train"]
                                      + Es * dev / m["eval_student"])
        + ltrain / m["infer_4_views"],
        "teachers": n_seeds * (Et * L / m["teacher_train"] + V / m["eval_teacher"]),
        "infer-teacher L, U, V": (L + U) / m["infer_4_views"] + V / m["infer_1_view"]
        + U / m["eval_teacher"],
        "dedup SIFT": min(sc.dedup_max_pairs, V) / m["sift_pairs"],
        "students": sum(n / r for n, r in students.values()),
        "student evals": n_student_evals * V / m["eval_student"],
        "process start-ups": n_processes * m["startup_s"]}
    return parts


# ----------------------------------------------------------------------------------------------
# small helpers


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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


def collect_prepared(ctx: "Context") -> dict:
    """``prepare``'s meta.json, with hashes of the list files it wrote: the prepared data is
    recomputed every sitting, and these say it is the same data (keys, labels, the draw of L)."""
    return read_json(ctx.data / "meta.json") | {
        "sha256": {name: record.sha256_of(ctx.data / name) for name in PREPARED_LISTS}}


def list_hashes(ctx: "Context", names) -> dict:
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
# steps


@dataclass
class Step:
    """One unit of the protocol: a subprocess (``command``) or a driver-internal function.

    ``command(ctx)`` returns the argv (built when the dependencies are done, so it can use
    their results); ``collect(ctx)`` reads what the step produced into a JSON-able dict;
    ``outputs(ctx)`` lists paths that must exist for a finished step to count as finished.
    """

    name: str
    kind: str  # prepare|split|train|eval|infer|dedup|select|merge|inspect|choose|labels
    deps: tuple[str, ...] = ()
    command: Optional[Callable[["Context"], list[str]]] = None
    internal: Optional[Callable[["Context"], dict]] = None
    collect: Callable[["Context"], dict] = lambda ctx: {}
    outputs: Callable[["Context"], list[Path]] = lambda ctx: []
    resumable_train: Optional[Path] = None  # a train-student run dir: resume with --resume
    rerun_flag: Optional[str] = None        # e.g. --overwrite: added when a failed try left output
    exclusive: bool = False                 # runs alone (its wall time is compared with others)
    group: str = ""
    stdout: bool = False                    # the command's stdout goes to logs/STEP.out alone


class Context:
    """Paths, chosen hyper-parameters and the results of finished steps."""

    def __init__(self, args: argparse.Namespace, scale: Scale):
        self.args, self.scale = args, scale
        self.work = Path(args.workdir).resolve()
        self.data = Path(args.data).resolve() if args.data else self.work / "data"
        self.images = self.data / "images"
        self.splits = self.work / "splits"
        self.stores = self.work / "stores"
        self.runs = self.work / "runs"
        self.logs = self.work / "logs"
        self.state_dir = self.work / "state"
        self.teacher, self.student = args.teacher, args.student
        self.results: dict[str, dict] = {}   # step name -> collected result

    # list files written by the split step
    def split(self, name: str) -> str:
        return str(self.splits / f"{name}.txt")

    def store(self, name: str) -> str:
        return str(self.stores / f"{name}.zarr")

    def run_dir(self, name: str) -> Path:
        return self.runs / name

    def result(self, step: str) -> dict:
        return self.results[step]


def ssld(ctx: Context, *args: Any) -> list[str]:
    return [ctx.args.ssld, *[str(a) for a in args]]


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


# ----------------------------------------------------------------------------------------------
# the protocol


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


def build_steps(ctx: Context) -> list[Step]:
    sc, T, S = ctx.scale, ctx.teacher, ctx.student
    steps: list[Step] = []
    add = steps.append

    # 0. data: the prepared Fashion-MNIST and the split/subset list files ------------------------
    add(Step("prepare", "prepare",
             command=lambda c: ssld(c, "prepare", "fashion-mnist", "--out", c.data),
             outputs=lambda c: [c.data / "meta.json"], collect=collect_prepared))
    add(Step("splits", "split", deps=("prepare",), internal=make_splits,
             outputs=lambda c: [Path(c.split(n)) for n in ("L", "Ltrain", "dev", "U", "V")]))

    # 1a. hyper-parameters, chosen on the dev split only (train on L minus dev) -----------------
    def tune(prefix: str, model: str, grid, epochs: int, extra: Callable[[Context], dict],
             deps: tuple[str, ...]) -> list[str]:
        return tune_steps(add, prefix, model, grid, epochs, extra, deps)

    tune("tune_teacher", T, sc.teacher_grid, sc.teacher_epochs,
         lambda c: {"data": c.split("Ltrain"), "extra": ("--supervised",)}, ("splits",))
    tune("tune_label_only", S, sc.student_grid, sc.student_epochs,
         lambda c: {"data": c.split("Ltrain"), "extra": ("--supervised",)}, ("splits",))
    # the SSLD student's lr is chosen with the best tuning teacher (it never saw dev)
    add(infer_step("infer_dev", "dev_Ltrain", "Ltrain", views=VIEWS,
                   checkpoint=lambda c: str(c.run_dir(c.result("choose_tune_teacher")["chosen"])
                                            / "last.pt"),
                   deps=("choose_tune_teacher",)))
    tune("tune_ssld", S, sc.student_grid, sc.student_epochs,
         lambda c: {"stores": (c.store("dev_Ltrain"),)}, ("infer_dev",))

    def hp(c: Context, which: str) -> tuple[float, float]:
        chosen = c.result(f"choose_{which}")
        return chosen["lr"], chosen["weight_decay"]

    # 1b. the teacher on L, 3 seeds ------------------------------------------------------------
    for seed in sc.seeds:
        name = f"teacher_s{seed}"
        add(train_step(name, deps=("choose_tune_teacher",), group="teacher",
                       build=lambda c, name=name, seed=seed: train_command(
                           c, name, model=T, epochs=sc.teacher_epochs,
                           lr=hp(c, "tune_teacher")[0], wd=hp(c, "tune_teacher")[1], seed=seed,
                           warmup=1.0, data=c.split("L"), extra=("--supervised",))))
        add(eval_step(f"eval_{name}", name, T, group="teacher"))
    teacher_ckpt = lambda c: str(c.run_dir("teacher_s0") / "last.pt")  # noqa: E731

    # 2. the teacher's labels: L and U with views (embeddings for U), V for dedup only --------
    add(infer_step("infer_L", "L", "L", views=VIEWS, checkpoint=teacher_ckpt,
                   deps=("teacher_s0",), exclusive=True))
    add(infer_step("infer_U", "U", "U", views=VIEWS, checkpoint=teacher_ckpt,
                   deps=("teacher_s0",), embeddings=True))
    add(infer_step("infer_V", "V", "V", views=1, checkpoint=teacher_ckpt,
                   deps=("teacher_s0",), embeddings=True))
    for store in ("L", "U", "V"):
        add(inspect_step(f"inspect_{store}", store, (f"infer_{store}",)))

    # 3. dedup U against V. SIFT verification upsamples these 28-px images to 320 px and costs
    # ~0.1-0.2 s per pair here, so stage 1 keeps each test image's single most similar pool
    # image (--top-m 1) and only the `dedup_max_pairs` most similar pairs go to SIFT: the
    # driver reads the cosine-only candidate list and raises --threshold to the cosine of the
    # max_pairs-th pair (never below ssld's default 0.8).
    cands = lambda c: c.stores / "U_vs_V.candidates.tsv"  # noqa: E731
    dups = lambda c: c.stores / "U_vs_V.dups"  # noqa: E731
    add(Step("dedup_candidates", "dedup", deps=("infer_U", "infer_V"),
             command=lambda c: ssld(c, "dedup", "--query", c.store("V"), "--pool",
                                    c.store("U"), "--out", cands(c), "--verify", "none",
                                    "--top-m", 1, "--threshold", sc.dedup_threshold),
             outputs=lambda c: [cands(c)],
             collect=lambda c: count_dups(c, cands(c), "dedup_candidates")))
    add(Step("choose_dedup_threshold", "choose", deps=("dedup_candidates",),
             internal=lambda c: dedup_threshold(c, cands(c))))
    add(Step("dedup", "dedup", deps=("choose_dedup_threshold",),
             command=lambda c: ssld(c, "dedup", "--query", c.store("V"), "--pool", c.store("U"),
                                    "--out", dups(c), "--top-m", 1, "--threshold",
                                    c.result("choose_dedup_threshold")["threshold"]),
             outputs=lambda c: [dups(c)], collect=lambda c: count_dups(c, dups(c), "dedup")))

    # 4. select-topk per class for each K (and "all of U" = K as large as the pool), merge ------
    pool_n = lambda c: c.result("inspect_U")["rows"]  # noqa: E731
    selections = [(f"top{k}", lambda c, k=k: k) for k in sc.ks] + [("all", pool_n)]
    for tag, k_of in selections:
        sel = f"U_{tag}"
        add(Step(f"select_{tag}", "select", deps=("dedup", "inspect_U"),
                 command=lambda c, sel=sel, k_of=k_of: ssld(
                     c, "select-topk", "--store", c.store("U"), "--k", k_of(c), "--exclude",
                     dups(c), "--out", c.store(sel), "--list-out", c.stores / f"{sel}.txt"),
                 outputs=lambda c, sel=sel: [Path(c.store(sel)), c.stores / f"{sel}.txt"],
                 rerun_flag="--overwrite"))
        add(inspect_step(f"inspect_{sel}", sel, (f"select_{tag}",)))
        merged = f"L+{sel}"
        add(Step(f"merge_{tag}", "merge", deps=(f"select_{tag}", "infer_L"),
                 command=lambda c, sel=sel, merged=merged: ssld(
                     c, "merge", c.store("L"), c.store(sel), "--out", c.store(merged)),
                 outputs=lambda c, merged=merged: [Path(c.store(merged))],
                 rerun_flag="--overwrite"))
        add(inspect_step(f"inspect_{merged}", merged, (f"merge_{tag}",)))
    add(Step("pseudo_label_check", "labels", deps=tuple(f"select_{t}" for t, _ in selections),
             internal=lambda c: pseudo_label_check(c, [f"U_{t}" for t, _ in selections])))
    add(eval_step("eval_teacher_s0_on_U", "teacher_s0", T, data="U_hidden", group="report"))

    # 5. students: same architecture in every row, same number of optimizer steps ------------
    L_n = lambda c: c.result("inspect_L")["rows"]  # noqa: E731

    def equal_epochs(c: Context, store: str) -> int:
        """Epochs over STORE that give (about) the steps of student_epochs over L."""
        n = c.result(f"inspect_{store}")["rows"]
        return max(1, math.floor(sc.student_epochs * L_n(c) / n + 0.5))

    def warmup_of(c: Context, store: Optional[str]) -> float:
        """One L-epoch of warmup, in epochs of the run's own data."""
        return 1.0 if store is None else L_n(c) / c.result(f"inspect_{store}")["rows"]

    def student(name: str, *, group: str, deps: tuple[str, ...], store: Optional[str] = None,
                supervised: bool = False, seed: int = 0, equal_steps: bool = True,
                extra: tuple = (), exclusive: bool = False, online: bool = False,
                epochs_of: Optional[Callable[[Context], int]] = None) -> None:
        def build(c: Context) -> list[str]:
            lr, wd = hp(c, "tune_label_only" if supervised else "tune_ssld")
            epochs = sc.student_epochs if (store in (None, "L") or not equal_steps) else \
                equal_epochs(c, store)
            if epochs_of is not None:
                epochs = epochs_of(c)
            warmup = warmup_of(c, None if store == "L" else store) if equal_steps else 1.0
            kwargs: dict[str, Any] = {}
            more: tuple = tuple(extra)
            if store is None:
                kwargs["data"] = c.split("L")
                more += ("--supervised",) if supervised else ()
                if online:
                    more += ("--teacher", T, "--teacher-checkpoint", teacher_ckpt(c))
            else:
                kwargs["stores"] = (c.store(store),)
            return train_command(c, name, model=S, epochs=epochs, lr=lr, wd=wd, seed=seed,
                                 warmup=warmup, extra=more, **kwargs)

        add(train_step(name, deps=deps, build=build, group=group, exclusive=exclusive))
        add(eval_step(f"eval_{name}", name, S, group=group))

    tuned = ("choose_tune_label_only", "choose_tune_ssld")
    for seed in sc.seeds:
        student(f"label_only_s{seed}", group="label_only", supervised=True, seed=seed,
                deps=tuned)
    for seed in sc.seeds:
        student(f"ssld_L_s{seed}", group="ssld_L", store="L", seed=seed,
                deps=tuned + ("inspect_L",), exclusive=seed == 0)
    main = f"L+U_top{sc.k_main}"
    for k in sc.ks:
        seeds = sc.seeds if k == sc.k_main else sc.seeds[:1]
        for seed in seeds:
            student(f"ssld_L+U_top{k}_s{seed}", group=f"ssld_L+U_top{k}", store=f"L+U_top{k}",
                    seed=seed, deps=tuned + ("inspect_L", f"inspect_L+U_top{k}"))
    student(f"ssld_{main}_more_s0", group=f"ssld_{main}_more", store=main, equal_steps=False,
            deps=tuned + ("inspect_L", f"inspect_{main}"))
    # controls for the "more steps" row: the same optimizer steps on L alone, labels and SSLD,
    # so that what the extra data adds is told apart from what the extra steps add
    def main_epochs_on_L(c: Context) -> int:
        """Epochs over L that give the steps of student_epochs over the main L + U store."""
        return math.floor(sc.student_epochs * c.result(f"inspect_{main}")["rows"] / L_n(c) + 0.5)

    student("label_only_more_s0", group="label_only_more", supervised=True,
            epochs_of=main_epochs_on_L, deps=tuned + ("inspect_L", f"inspect_{main}"))
    student("ssld_L_more_s0", group="ssld_L_more", store="L", epochs_of=main_epochs_on_L,
            deps=tuned + ("inspect_L", f"inspect_{main}"))
    student("ssld_L+U_all_s0", group="ssld_L+U_all", store="L+U_all",
            deps=tuned + ("inspect_L", "inspect_L+U_all"))
    # kl gets every seed: JS vs KL is the method's loss claim, and one seed could not resolve it
    for loss in ("skl", "kl", "soft-ce"):
        for seed in sc.seeds if loss == "kl" else sc.seeds[:1]:
            student(f"loss_{loss}_s{seed}", group=f"loss_{loss}", store=main, seed=seed,
                    extra=("--loss", loss), deps=tuned + ("inspect_L", f"inspect_{main}"))
    student("views_global_s0", group="views_global", store=main, extra=("--views", "global"),
            deps=tuned + ("inspect_L", f"inspect_{main}"))
    student("online_L_s0", group="online_L", online=True, exclusive=True,
            deps=tuned + ("teacher_s0",))

    # fine-tune of the declared main SSLD student (K = k_main, seed 0) on L: JS to L's stored
    # labels, lr / 10, a few epochs (SSLD's ImageNet-1k fine-tune stage)
    def finetune(c: Context) -> list[str]:
        lr, wd = hp(c, "tune_ssld")
        return train_command(c, "finetune_s0", model=S, epochs=sc.finetune_epochs, lr=lr / 10,
                             wd=wd, seed=0, warmup=0.0, stores=(c.store("L"),),
                             extra=("--init", c.run_dir(f"ssld_{main}_s0") / "last.pt"))
    add(train_step("finetune_s0", deps=(f"ssld_{main}_s0",), build=finetune, group="finetune"))
    add(eval_step("eval_finetune_s0", "finetune_s0", S, group="finetune"))
    return steps


def infer_step(name: str, store: str, data: str, *, views: int,
               checkpoint: Callable[[Context], str], deps: tuple[str, ...],
               embeddings: bool = False, exclusive: bool = False) -> Step:
    """``ssld infer-teacher`` of the teacher over a list file into STORE (resumes itself)."""
    def command(ctx: Context) -> list[str]:
        cmd = ssld(ctx, "infer-teacher", "--model", ctx.teacher, "--checkpoint", checkpoint(ctx),
                   "--num-classes", 10, "--class-names", ctx.data / "classes.txt",
                   "--data", ctx.split(data), "--root", ctx.images, "--out", ctx.store(store),
                   "--input-size", INPUT_SIZE, "--views", views, "--topk", 10, "--seed", 0,
                   "--batch-size", 256, "--no-progress", *runtime(ctx))
        if ctx.args.device != "cuda":
            cmd += ["--decoder", "pil"]
        return cmd + (["--embeddings"] if embeddings else [])

    def collect(ctx: Context) -> dict:
        return {"store": ctx.store(store)}  # its contents: the inspect step's JSON

    return Step(name=name, kind="infer", deps=deps, command=command, collect=collect,
                outputs=lambda c: [Path(c.store(store))], exclusive=exclusive, group="teacher")


def make_splits(ctx: Context) -> dict:
    """The list files every later step reads (all relative to the prepared ``images/``).

    L = the prepared labeled set (at smoke scale a per-class subset), dev = a fixed
    ``dev_per_class`` images per class of L (hyper-parameters only), Ltrain = L minus dev,
    U = the pool (unlabeled list), V = the test set; U_hidden = U with its hidden labels, used
    only by the report-only teacher evaluation on U.
    """
    sc = ctx.scale
    rng = random.Random(DEV_SEED)
    labeled = per_class(read_list(ctx.data / "labeled.txt"), sc.labeled_per_class, rng)
    dev = per_class(labeled, sc.dev_per_class, rng)
    dev_keys = {k for k, _ in dev}
    ltrain = [row for row in labeled if row[0] not in dev_keys]
    pool = read_list(ctx.data / "pool.txt")
    hidden = dict(read_list(ctx.data / "pool_labels.txt"))
    if sc.pool_size is not None:
        pool = sorted(rng.sample(pool, sc.pool_size), key=lambda r: r[0])
    val = per_class(read_list(ctx.data / "val.txt"), sc.val_per_class, rng)
    lists = {"L": labeled, "dev": dev, "Ltrain": ltrain, "U": [(k, None) for k, _ in pool],
             "V": val, "U_hidden": [(k, hidden[k]) for k, _ in pool]}
    for name, rows in lists.items():
        write_list(Path(ctx.split(name)), rows)
    return {name: len(rows) for name, rows in lists.items()} | {"dev_seed": DEV_SEED} | \
        list_hashes(ctx, lists)


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


# ----------------------------------------------------------------------------------------------
# the scheduler: dependencies, resume, up to --jobs steps at once, exclusive steps alone


class Driver:
    def __init__(self, ctx: Context, steps: list[Step],
                 rows: Optional[Callable[[Context], list[dict]]] = None,
                 study: str = "SSLD ablations on Fashion-MNIST (issue 6)",
                 extra: Optional[Callable[[Context], dict]] = None):
        self.ctx, self.steps = ctx, {s.name: s for s in steps}
        self.rows = rows or row_spec        # the report's table (study 1's by default)
        self.study, self.extra = study, extra
        self.order = [s.name for s in steps]
        self.state: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.results_path = Path(ctx.args.results).resolve()
        for name in self.order:
            path = ctx.state_dir / f"{name}.json"
            self.state[name] = read_json(path) if path.exists() else {"name": name,
                                                                       "attempts": []}
        # the results file as the last sitting left it: the record to resume from
        self.saved = read_json(self.results_path) if self.results_path.exists() else {}
        self.discarded: dict[str, list] = dict(self.saved.get("discarded") or {})
        self.reused: set[str] = set()          # recorded steps taken as they are
        self.expected: dict[str, dict] = {}    # recomputed step -> its recorded entry
        self.to_discard: list[tuple[str, str]] = []  # (step, reason), applied by the loop
        self.environment, self.package = record.environment(), record.package()
        self._session_iso = now()

    # -- state
    def save_state(self, name: str) -> None:
        """The workdir's own state of a step (the record stays in the results file)."""
        write_json(self.ctx.state_dir / f"{name}.json",
                   {k: v for k, v in self.state[name].items() if k != "record"})

    def is_done(self, name: str) -> bool:
        st, step = self.state[name], self.steps[name]
        if not st.get("done"):
            return False
        missing = [p for p in step.outputs(self.ctx) if not Path(p).exists()]
        if missing:
            print(f"[{name}] marked finished but {missing[0]} is missing: running it again",
                  flush=True)
            st["done"] = False
            return False
        return True

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(self.ctx.args.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        return env

    def settings(self) -> dict[str, Any]:
        """What every step of the results file was computed with (``record.SETTINGS``)."""
        ctx = self.ctx
        return {"study": self.study, "scale": ctx.args.scale,
                "scale_config": record.json_round_trip(asdict(ctx.scale)),
                "teacher": ctx.teacher, "student": ctx.student, "input_size": INPUT_SIZE,
                "views": VIEWS, "threads": ctx.args.threads, "device": ctx.args.device,
                "environment": self.environment}

    # -- resuming: the workdir first, then the record
    def load_finished(self, wanted: set[str]) -> None:
        """Results of the steps finished in this workdir, then of those the results file
        records (reused or recomputed: ``adopt_record``)."""
        for name in self.order:
            if self.is_done(name):
                self.check_command(name)
                self.ctx.results[name] = self.state[name]["result"]
        self.adopt_record(wanted)

    def adopt_record(self, wanted: set[str]) -> None:
        """Take the steps the results file records as finished and this workdir does not
        hold: reused as recorded, or recomputed and compared (``record.plan``). Refuses a
        file recorded with other settings or versions, a recorded step whose command is not
        the one it would run now, and a workdir result that differs from the record."""
        ctx, saved_steps = self.ctx, self.saved.get("steps") or {}
        if not saved_steps:
            return
        wrong = record.settings_differences(self.saved, self.settings())
        if wrong:
            raise SystemExit(f"{self.results_path} records steps computed with other settings:"
                             "\n  " + "\n  ".join(wrong) + "\nuse another --results, or these "
                             "settings")
        cpu = (self.saved.get("environment") or {}).get("cpu")
        if cpu and cpu != self.environment["cpu"]:
            print(f"note: the record was computed on {cpu}, this is {self.environment['cpu']}; "
                  "recomputed steps show whether results are the same here", flush=True)
        for name, entry in saved_steps.items():
            if name not in self.steps and entry.get("done"):
                self.discarded.setdefault(name, []).append(
                    entry | {"discarded": {"session": self._session_iso,
                                           "reason": "no such step in the protocol now"}})
        usable, conflicts, recomputed_here = [], [], set()
        for name in self.topological():  # a step's inputs are settled before it
            entry, step = saved_steps.get(name), self.steps[name]
            if not entry or not entry.get("done") or entry.get("result") is None:
                continue
            if name in ctx.results:  # finished in this workdir as well: they must agree
                diffs = record.differences(entry["result"], ctx.results[name], step.kind)
                if diffs:
                    conflicts.append(f"{name}: the workdir's result is not the record's: "
                                     f"{diffs[0]}")
                entry["result"] = record.merged(entry["result"], ctx.results[name])
                self.state[name]["record"] = entry
                if any(note.get("session") == self.state[name].get("session")
                       for note in entry.get("recomputed", [])):
                    recomputed_here.add(name)  # for the record, by an earlier start here
                continue
            if not all(d in ctx.results for d in step.deps):
                continue  # an input of it is not recorded: it runs again
            if step.command is not None:
                cmd = step.command(ctx)
                if record.comparable(cmd, str(ctx.work), str(ctx.data)) != record.comparable(
                        entry["command"], self.saved.get("workdir"), self.saved.get("data")):
                    conflicts.append(f"{name} is recorded with another command:\n    was: "
                                     f"{entry['command']}\n    now: {' '.join(cmd)}")
                    continue
                if entry["command"] != " ".join(cmd):  # the same command elsewhere
                    entry.setdefault("command_as_run", entry["command"])
                    entry["command"] = " ".join(cmd)
            ctx.results[name] = entry["result"]
            usable.append(name)
        if conflicts:
            raise SystemExit(f"{self.results_path} does not fit this run:\n  "
                             + "\n  ".join(conflicts) + "\nuse another --results (or "
                             "--workdir), or restore the protocol that wrote it")
        graph = dict(deps={n: s.deps for n, s in self.steps.items()},
                     kinds={n: s.kind for n, s in self.steps.items()},
                     has_command={n: s.command is not None for n, s in self.steps.items()})
        plan = record.plan(**graph, recorded=usable, wanted=wanted,
                           done_here={n for n in ctx.results if n not in usable},
                           recomputed_here=recomputed_here)
        for name, deps in record.base_deps(plan, **graph).items():
            self.steps[name].deps = deps
        for name in usable:
            st = self.state[name]
            st["record"] = saved_steps[name]
            if name in plan.recompute:
                del ctx.results[name]
                self.expected[name] = saved_steps[name]
                st["done"] = False
            else:  # in memory only: nothing of it is in this workdir
                st.update(done=True, result=saved_steps[name]["result"])
                self.reused.add(name)
        recompute = [n for n in self.order if n in plan.recompute]
        print(f"from {self.results_path.name}: {len(self.reused)} recorded steps reused, "
              f"{len(recompute)} recomputed and compared with the record"
              + (f" ({', '.join(recompute)})" if recompute else ""), flush=True)

    def check_reproduced(self, name: str, result: dict, seconds: float) -> dict:
        """A recomputed step's result against the record: the record (with the new
        fingerprints) when equal; otherwise the step fails, or with --discard-unreproduced
        the recorded steps that depend on it are discarded (``apply_discards``)."""
        entry, kind = self.expected.pop(name), self.steps[name].kind
        diffs = record.differences(entry["result"], result, kind)
        note = {"session": self._session_iso, "wall_s": round(seconds, 2),
                "reproduced": not diffs}
        with self.lock:
            entry.setdefault("recomputed", []).append(note)
            if not diffs:
                entry["result"] = record.merged(entry["result"], result)
                return entry["result"]
            note.update(differences=diffs, result=result)
        reason = (f"recomputed {name} does not reproduce the record: " + "; ".join(diffs[:4])
                  + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""))
        if getattr(self.ctx.args, "discard_unreproduced", False):
            self.to_discard.append((name, reason))
            return result
        raise RuntimeError(
            reason + ". Rows recorded from its outputs are not mixed with rows from these: what "
            "depends on it waits. Rerun with --discard-unreproduced to move the recorded steps "
            "that depend on it to the results file's 'discarded' list and measure them again, "
            "or use another --results")

    def apply_discards(self) -> None:
        """Move the record of every step that depends on an unreproduced one to
        ``discarded`` (with the reason); those not run in this sitting run again."""
        while self.to_discard:
            name, reason = self.to_discard.pop(0)
            step = self.steps[name]
            # an evaluation or inspect that differs says its checkpoint or store differs
            roots = list(step.deps) if step.kind in record.CHECKS else [name]
            victims = set(roots) | {name} | self.dependents(roots)
            moved = []
            for victim in self.order:
                st = self.state[victim]
                if victim not in victims or st.get("record") is None:
                    continue
                why = reason if victim == name else f"depends on {name}: {reason}"
                self.discarded.setdefault(victim, []).append(
                    st["record"] | {"discarded": {"session": self._session_iso, "reason": why}})
                st["record"] = None
                self.expected.pop(victim, None)
                if victim in self.reused:  # taken from the record: measure it again
                    self.reused.discard(victim)
                    self.ctx.results.pop(victim, None)
                    st.update(done=False, result=None)
                moved.append(victim)
            print(f"[{now()}] discarded the record of {len(moved)} step(s) that depend on "
                  f"{name} (kept under 'discarded' in {self.results_path.name}); they run "
                  f"again: {', '.join(moved)}", flush=True)

    def urgency(self, name: str) -> tuple[bool, bool, bool]:
        """Ready steps start in list order, except that checks of the record come first (a
        mismatch should stop its dependents early), then evaluations (seconds; until its
        evaluation is recorded, a finished run lives only in the workdir, which a sitting's
        end takes), then interrupted training runs (their epochs die with the workdir too)."""
        step = self.steps[name]
        partial = step.resumable_train is not None and \
            (self.ctx.run_dir(str(step.resumable_train)) / "last.pt").exists()
        return name not in self.expected, step.kind != "eval", not partial

    def topological(self) -> list[str]:
        """The steps with every dependency before its dependents (else in list order)."""
        out: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name not in seen:
                seen.add(name)
                for dep in self.steps[name].deps:
                    visit(dep)
                out.append(name)

        for name in self.order:
            visit(name)
        return out

    def dependents(self, names: list[str]) -> set[str]:
        out: set[str] = set()
        todo = list(names)
        while todo:
            current = todo.pop()
            for other in self.order:
                if current in self.steps[other].deps and other not in out:
                    out.add(other)
                    todo.append(other)
        return out

    # -- one step
    def finished_unseen(self, step: Step) -> Optional[dict]:
        """The result of a training run that reached its last epoch after the driver that
        started it died (its process outlives the driver), or None: such a run is collected,
        not resumed (``--resume`` refuses a finished run)."""
        if step.resumable_train is None:
            return None
        if not (self.ctx.run_dir(str(step.resumable_train)) / "last.pt").exists():
            return None
        try:
            return step.collect(self.ctx)
        except (RuntimeError, OSError, ValueError, KeyError):
            return None   # not finished (or unreadable): resume it

    def run_step(self, name: str) -> bool:
        ctx, step, st = self.ctx, self.steps[name], self.state[name]
        start, t0 = now(), time.perf_counter()
        attempt = {"start": start, "wall_s": None, "rc": None}
        rc = 0
        try:
            if step.internal is not None:
                st["attempts"].append(attempt)
                result = step.internal(ctx)
            else:
                cmd = step.command(ctx)
                base = list(cmd)
                finished = self.finished_unseen(step) if st.get("command") == base else None
                if finished is not None:
                    cmd = None   # the run ended while no driver watched it (the driver died)
                elif step.resumable_train is not None and \
                        (ctx.run_dir(str(step.resumable_train)) / "last.pt").exists():
                    cmd = cmd + ["--resume"]
                elif step.rerun_flag and any(Path(p).exists() for p in step.outputs(ctx)):
                    cmd = cmd + [step.rerun_flag]
                if st.get("command") and st["command"] != base and st.get("done"):
                    raise RuntimeError(f"{name} finished earlier with another command; use a "
                                       f"new --workdir or delete {ctx.state_dir / name}.json")
                st["command"] = base
                st["attempts"].append(attempt)
                self.save_state(name)
                if cmd is None:
                    result = finished
                else:
                    ctx.logs.mkdir(parents=True, exist_ok=True)
                    with open(ctx.logs / f"{name}.log", "a") as log, \
                            open(ctx.logs / f"{name}.out", "w") if step.stdout else log as out:
                        log.write(f"\n### {start} $ {' '.join(cmd)}\n")
                        log.flush()
                        proc = subprocess.Popen(cmd, stdout=out,
                                                stderr=log if step.stdout else subprocess.STDOUT,
                                                env=self.env(), start_new_session=True)
                        with self.lock:
                            self.procs[name] = proc
                        rc = proc.wait()
                        with self.lock:
                            self.procs.pop(name, None)
                    if rc != 0:
                        raise RuntimeError(f"exit status {rc}; see {ctx.logs / name}.log: "
                                           f"{tail(ctx.logs / f'{name}.log')}")
                    result = step.collect(ctx)
            if name in self.expected:
                result = self.check_reproduced(name, result, time.perf_counter() - t0)
            ok, error = True, None
        except Exception as exc:  # noqa: BLE001 - a failed step must not stop the others
            ok, error, result = False, f"{type(exc).__name__}: {exc}", None
            rc = rc or 1
        attempt.update(wall_s=round(time.perf_counter() - t0, 2), rc=rc if not ok else 0)
        with self.lock:
            st["done"], st["error"] = ok, error
            if ok:
                st["result"], st["session"] = result, self._session_iso
                ctx.results[name] = result
            self.save_state(name)
        return ok

    # -- the loop
    def run(self, only: Optional[set[str]] = None) -> int:
        ctx = self.ctx
        wanted = set(self.order) if only is None else self.with_deps(only)
        self.load_finished(wanted)
        failed: set[str] = set()
        running: dict[str, threading.Thread] = {}
        finished: list[tuple[str, bool]] = []
        cond = threading.Condition()
        session_start = time.perf_counter()

        def worker(name: str) -> None:
            ok = self.run_step(name)
            with cond:
                finished.append((name, ok))
                cond.notify()

        def blocked(name: str) -> bool:
            return any(d in failed or self.blocked_by_failure(d, failed)
                       for d in self.steps[name].deps)

        try:
            while True:
                with cond:
                    while finished:
                        name, ok = finished.pop(0)
                        running.pop(name).join()
                        wall = self.state[name]["attempts"][-1]["wall_s"]
                        if ok:
                            print(f"[{now()}] done   {name} ({wall:.1f} s)", flush=True)
                        else:
                            failed.add(name)
                            print(f"[{now()}] FAILED {name} ({wall:.1f} s): "
                                  f"{self.state[name]['error']}", flush=True)
                        self.apply_discards()
                        self.write_results(session_start)
                pending = [n for n in self.order if n in wanted and n not in ctx.results
                           and n not in failed and n not in running and not blocked(n)]
                ready = sorted((n for n in pending
                                if all(d in ctx.results for d in self.steps[n].deps)),
                               key=self.urgency)
                exclusive_running = any(self.steps[n].exclusive for n in running)
                started = False
                for name in ready:
                    step = self.steps[name]
                    if exclusive_running or len(running) >= ctx.args.jobs:
                        break
                    if step.exclusive and running:
                        continue  # waits until the machine is free of this driver's steps
                    if step.internal is not None:  # quick, in this thread
                        ok = self.run_step(name)
                        print(f"[{now()}] {'done  ' if ok else 'FAILED'} {name}"
                              + ("" if ok else f": {self.state[name]['error']}"), flush=True)
                        if not ok:
                            failed.add(name)
                        self.apply_discards()
                        self.write_results(session_start)
                        started = True
                        break
                    print(f"[{now()}] start  {name}", flush=True)
                    thread = threading.Thread(target=worker, args=(name,), daemon=True)
                    running[name] = thread
                    thread.start()
                    started = True
                    if step.exclusive:
                        break
                if started:
                    continue
                if not running:
                    break
                with cond:
                    if not finished:
                        cond.wait(timeout=5)
        except KeyboardInterrupt:
            print("interrupted: stopping the running steps (rerun the same command to resume)",
                  flush=True)
            with self.lock:
                for proc in self.procs.values():
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for thread in running.values():
                thread.join(timeout=60)
            self.write_results(session_start)
            return 130
        self.write_results(session_start)
        left = [n for n in self.order if n in wanted and n not in ctx.results]
        if failed or left:
            print(f"{len(failed)} step(s) failed: {', '.join(sorted(failed))}; "
                  f"{len(left)} not finished", flush=True)
            return 1
        print(f"all {len(wanted)} steps finished; results in {self.results_path}", flush=True)
        return 0

    def check_command(self, name: str) -> None:
        """Refuse to reuse a finished step whose command would now be different."""
        step, saved = self.steps[name], self.state[name].get("command")
        if step.command is None or saved is None or \
                not all(d in self.ctx.results for d in step.deps):
            return
        now_cmd, work = step.command(self.ctx), str(self.ctx.work)
        if record.comparable(now_cmd, work) != record.comparable(saved, work):
            raise SystemExit(
                f"step {name} finished earlier with another command:\n  was: {' '.join(saved)}"
                f"\n  now: {' '.join(now_cmd)}\nuse a new --workdir, or delete "
                f"{self.ctx.state_dir / name}.json and the step's outputs to redo it")

    def blocked_by_failure(self, name: str, failed: set[str]) -> bool:
        """Whether ``name`` waits on a failed step. A finished step (its result recorded or
        computed here) does not: its dependents read its result, not what failed above it."""
        if name in failed:
            return True
        if name in self.ctx.results:
            return False
        return any(self.blocked_by_failure(d, failed) for d in self.steps[name].deps)

    def with_deps(self, names: set[str]) -> set[str]:
        out: set[str] = set()
        todo = [n for n in self.order if any(re.fullmatch(p, n) for p in names)]
        if not todo:
            raise SystemExit(f"--only {' '.join(sorted(names))} matches no step")
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.steps[n].deps)
        return out

    # -- results
    def write_results(self, session_start: float) -> None:
        """The results file: every step (a recorded step as its record, with what this sitting
        recomputed of it), the discarded records, the sittings with their package and
        environment."""
        ctx, saved_steps = self.ctx, self.saved.get("steps") or {}
        with self.lock:
            steps = {}
            for name in self.order:
                st = self.state[name]
                if st.get("record") is not None:
                    steps[name] = st["record"]
                    continue
                earlier = saved_steps.get(name) or {}
                if earlier.get("error") and not st.get("attempts") and not st.get("done"):
                    # an earlier sitting's failure (study 2's gate), not tried in this one:
                    # an outcome of the protocol, kept until the step runs again
                    steps[name] = earlier
                    continue
                walls = [a["wall_s"] for a in st.get("attempts", []) if a["wall_s"] is not None]
                steps[name] = {
                    "kind": self.steps[name].kind, "group": self.steps[name].group,
                    "alone": self.steps[name].exclusive,
                    "done": bool(st.get("done")), "error": st.get("error"),
                    "command": " ".join(st["command"]) if st.get("command") else None,
                    "wall_s": round(sum(walls), 2) if walls else None,
                    "attempts": len(st.get("attempts", [])),
                    "interrupted_attempts": sum(1 for a in st.get("attempts", [])
                                                if a["wall_s"] is None),
                    "session": st.get("session"), "result": st.get("result")}
            sessions = list(self.saved.get("sessions", []))
            this = {"started": self._session_iso,
                    "wall_s": round(time.perf_counter() - session_start, 1),
                    "package": self.package, "environment": self.environment}
            if sessions and sessions[-1]["started"] == this["started"]:
                sessions[-1] = this
            else:
                sessions.append(this)
            self.saved["sessions"] = sessions
            data = {"study": self.study,
                    "scale": ctx.args.scale, "updated": now(), "workdir": str(ctx.work),
                    "data": str(ctx.data), "teacher": ctx.teacher, "student": ctx.student,
                    "input_size": INPUT_SIZE, "views": VIEWS, "threads": ctx.args.threads,
                    "jobs": ctx.args.jobs, "device": ctx.args.device,
                    "scale_config": asdict(ctx.scale),
                    # the versions the recorded steps are checked against (the first ones
                    # recorded; sitting 1's steps ran before versions were recorded)
                    "environment": self.saved.get("environment") or self.environment,
                    "sessions": sessions, "rows": self.rows(ctx), "steps": steps}
            if self.discarded:
                data["discarded"] = self.discarded
            if self.extra is not None:
                data.update(self.extra(ctx))
            write_json(self.results_path, data)


def row_spec(ctx: Context) -> list[dict]:
    """The table the report prints: one row per setup, its eval steps (one per seed)."""
    sc, T, S = ctx.scale, ctx.teacher, ctx.student
    main = f"L + U_top{sc.k_main}"
    seeds = list(sc.seeds)

    def row(group: str, label: str, data: str, note: str, n_seeds: list[int], model: str = S,
            prefix: Optional[str] = None) -> dict:
        prefix = prefix or group
        return {"group": group, "label": label, "model": model, "data": data, "note": note,
                "train_steps": [f"{prefix}_s{s}" for s in n_seeds],
                "eval_steps": [f"eval_{prefix}_s{s}" for s in n_seeds]}

    rows = [row("teacher", f"teacher {T}, label-only (CE + smoothing)", "L", "", seeds, T),
            row("label_only", "student, label-only baseline (CE + smoothing)", "L", "", seeds),
            row("ssld_L", "student, SSLD JS, stored labels (replay)", "L", "", seeds)]
    for k in sc.ks:
        rows.append(row(f"ssld_L+U_top{k}", f"student, SSLD JS, L + top-{k}/class of U",
                        f"L + U_top{k}",
                        "equal steps" + (" (declared main setup)" if k == sc.k_main else ""),
                        seeds if k == sc.k_main else seeds[:1]))
    rows += [
        row(f"ssld_L+U_top{sc.k_main}_more",
            f"student, SSLD JS, L + top-{sc.k_main}/class, same epochs as L",
            main, "more data AND more steps", [0]),
        row("label_only_more", "student, label-only, the steps of row 6", "L",
            "control: more steps, no extra data", [0]),
        row("ssld_L_more", "student, SSLD JS on L, the steps of row 6", "L",
            "control: more steps, no extra data", [0]),
        row("ssld_L+U_all", "student, SSLD JS, L + all of U (no selection)", "L + U_all",
            "equal steps", [0]),
        row("loss_skl", "student, loss skl (PaddleClas JSDivLoss)", main, "equal steps", [0]),
        row("loss_kl", "student, loss kl (T = 1)", main, "equal steps", seeds),
        row("loss_soft-ce", "student, loss soft-ce", main, "equal steps", [0]),
        row("views_global", "student, SSLD JS, global views (RRC + view-0 target)", main,
            "equal steps", [0]),
        row("finetune", f"student, fine-tune of the main SSLD student on L (JS, lr/10, "
            f"{sc.finetune_epochs} epochs)", main + ", then L", "steps: the fine-tune's only, "
            "after row 4's", [0]),
        row("online_L", "student, SSLD JS, online teacher", "L", "same steps as SSLD on L", [0]),
    ]
    return rows


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text().replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text[-lines:] if ln.strip())


def make_parser(description: str, scales: dict) -> argparse.ArgumentParser:
    """The options every protocol of this driver takes (study 2 adds its own)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="Folder for data, stores, runs, logs and step state (resumable).")
    parser.add_argument("--scale", choices=sorted(scales), default="smoke",
                        help="smoke: a few hundred images, 2 epochs, minutes (proves the driver "
                             "runs; its numbers mean nothing); full: the study.")
    parser.add_argument("--data", default=None,
                        help="An existing `ssld prepare fashion-mnist` folder (default: "
                             "WORKDIR/data, prepared on the first run).")
    parser.add_argument("--results", default=None,
                        help="Results JSON (default: results/SCALE.json next to this script).")
    parser.add_argument("--jobs", type=int, default=2,
                        help="Steps run at once (each with --threads torch threads).")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every ssld process (1 is fastest on the busy "
                             "2-core machine: see the README).")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="Decoding workers of train-student / infer-teacher / eval (0: decode "
                             "28x28 PNGs in-process).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("--ssld", default=None, help="The ssld console script (default: the one "
                        "next to this Python, else ssld on PATH).")
    parser.add_argument("--only", nargs="+", default=None, metavar="REGEX",
                        help="Run only the steps matching these patterns, plus their "
                             "dependencies (e.g. --only 'teacher_s.*').")
    parser.add_argument("--list", action="store_true",
                        help="Print the steps with their state (done here, reused or recomputed "
                             "from the results file, failed) and exit.")
    parser.add_argument("--discard-unreproduced", action="store_true",
                        help="When a recorded step, recomputed because a pending step needs its "
                             "outputs, does not reproduce its recorded result: move the recorded "
                             "steps that depend on it to the results file's 'discarded' list and "
                             "run them again (default: stop them, and say so).")
    parser.add_argument("--estimate", action="store_true",
                        help="Print the expected run time at the measured throughput and exit.")
    return parser


def run_main(parser: argparse.ArgumentParser, args: argparse.Namespace, scales: dict, *,
             build: Callable[[Context], list[Step]], rows: Callable[[Context], list[dict]],
             study: str, estimate_of: Callable, results_dir: Path,
             extra: Optional[Callable[[Context], dict]] = None) -> int:
    """Check the options, then --estimate, --list or run the protocol ``build`` describes."""
    if args.ssld is None:
        beside = Path(sys.executable).parent / "ssld"
        args.ssld = str(beside) if beside.exists() else (shutil.which("ssld") or "ssld")
    if args.results is None:
        args.results = str(results_dir / f"{args.scale}.json")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    scale = scales[args.scale]
    if args.estimate:
        parts = estimate_of(scale, build(Context(args, scale)))
        total = sum(parts.values())
        for name, seconds in parts.items():
            print(f"{name:<54} {seconds / 60:6.1f} min")
        print(f"{'total, one step at a time':<54} {total / 3600:6.2f} h")
        speedup = getattr(estimate_of, "two_jobs_speedup", MEASURED["two_jobs_speedup"])
        print(f"{'total, --jobs 2':<54} {total / speedup / 3600:6.2f} h "
              f"(at the measured {speedup}x of two 1-thread jobs)")
        return 0
    ctx = Context(args, scale)
    ctx.work.mkdir(parents=True, exist_ok=True)
    marker = ctx.work / "scale.txt"
    if marker.exists() and marker.read_text().strip() != args.scale:
        parser.error(f"{ctx.work} holds a {marker.read_text().strip()} run; use another "
                     "--workdir for --scale " + args.scale)
    marker.write_text(args.scale + "\n")
    driver = Driver(ctx, build(ctx), rows=rows, study=study, extra=extra)
    unknown = [n for row in rows(ctx) for n in row["train_steps"] + row["eval_steps"]
               if n not in driver.steps]
    if unknown:
        raise SystemExit(f"internal error: the report's rows name unknown steps {unknown}")

    def stop(signum, frame):  # `kill PID` stops the running steps as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored)
    if args.list:
        driver.load_finished(set(driver.order))
        for name in driver.order:
            st = driver.state[name]
            state = ("reused" if name in driver.reused else
                     "recompute" if name in driver.expected else
                     "done" if st.get("done") else ("failed" if st.get("error") else "-"))
            print(f"{name:<36} {driver.steps[name].kind:<8} {state}")
        return 0
    print(f"ssld {study}, scale {args.scale}: {len(driver.order)} steps, "
          f"{args.jobs} at once, {args.threads} thread(s) each; workdir {ctx.work}", flush=True)
    return driver.run(set(args.only) if args.only else None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser(__doc__.split("\n\n")[0], SCALES)
    args = parser.parse_args(argv)
    return run_main(parser, args, SCALES, build=build_steps, rows=row_spec,
                    study="SSLD ablations on Fashion-MNIST (issue 6)", estimate_of=estimate,
                    results_dir=RESULTS_DIR)


if __name__ == "__main__":
    sys.exit(main())
