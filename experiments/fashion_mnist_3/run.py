#!/usr/bin/env python3
"""Study 3 on Fashion-MNIST (issue 27): does replayed augmentation make stored labels a better
teacher?

The protocol as steps for the study driver (``experiments/driver.py``), on study 2's data,
splits, teacher command and budget unit (``experiments/fashion_mnist_2/run.py``) and the shared
step builders (``experiments/steps.py``): only its record sets, steps, choices, budget rule and
table are here. Protocol, rules, run time and how to resume: ``README.md`` next to this file.

    python experiments/fashion_mnist_3/run.py --workdir /work/fm3/full --scale full \\
        --src /usr/share/datasets/fashion-mnist

Resumable as study 2, in its workdir and across sittings from the committed results file
(``experiments/record.py``): run the same command again. Steps start in the order of the
README's row priority; ``budget_x9`` decides, from the driver time already spent and the
throughput this study measured (never from a top-1), how many seeds of the 9x rows fit the
budget, and the ``allow_x9_sN`` steps of the seeds that do not fit fail on purpose.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: the checkout's `experiments` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import driver, record  # noqa: E402
from experiments.driver import Context, Step, read_json, write_json  # noqa: E402
from experiments.fashion_mnist_2 import run as study2  # noqa: E402
from experiments.steps import (  # noqa: E402
    INPUT_SIZE, MEASURED, STUDENT, TEACHER, dedup_steps, eval_step, infer_step, inspect_step,
    merge_steps, prepare_step, pseudo_label_check, read_list, select_steps, train_command,
    train_step, tune_steps, write_list)
from student_train.loss_registry import LOSS_SPECS  # noqa: E402

HERE = Path(__file__).resolve().parent
# the record this study's splits must equal and its teacher and stores are compared with
STUDY2_RESULTS = HERE.parent / "fashion_mnist_2" / "results" / "full.json"
TUNING_VIEWS = 4  # the views of the dev stores the lr grids train on (study 2's)
# a training run's start-up and its evaluation beyond its epochs (the 9x rows' budget rule)
RUN_OVERHEAD_S = 120.0


@dataclass(frozen=True)
class RecordSet:
    """One kind of stored view: the infer-teacher options that make it."""

    label: str
    options: tuple[str, ...]


RA = ("--augment", "rand-m9-n2-mstd0.5", "--erase", "0.25")  # ml-dr's set (README)
RECORD_SETS = {  # in the order of cost: bytes per view, work per view
    "crop": RecordSet("crop only", ()),
    "ra": RecordSet("RandAugment + erasing", RA),
    # ml-dr mixes with MixUp (alpha 1, p 0.5) then CutMix (alpha 1, p 0.5): 75 % of its views
    # are mixed; ssld mixes a view once, so the same 75 %, half MixUp and half CutMix
    "mix": RecordSet("RandAugment + erasing + MixUp/CutMix",
                     RA + ("--mixup", "1.0", "--cutmix", "1.0", "--mix-prob", "0.75",
                           "--mixup-switch-prob", "0.5")),
}
# throughput of the augmented record sets relative to crop-only, for the estimate only:
# measured on 2026-12-07 (README, "Compute"): train-student replaying 6,000 images x 4 views
# (2 epochs, 2 rounds) and infer-teacher writing them, one thread, load 1-2
SPEED = {"ssld_train": {"ra": 0.75, "mix": 0.60},
         "infer_4_views": {"ra": 0.76, "mix": 0.51}}


@dataclass(frozen=True)
class Scale3:
    """Sizes of one run of protocol 3. The split fields are study 2's (``make_split_lists``)."""

    labeled_per_class: Optional[int]  # L (None: study 1's L, 600/class)
    extra_per_class: int              # T = L + this many labelled pool images per class
    pool_size: int                    # U
    dev_per_class: int                # dev split of L: hyper-parameters only
    val_per_class: Optional[int]      # V
    teacher_epochs: int               # the teacher on T, and the tuning teacher on Ttrain
    teacher_lr: float                 # study 2's choice on dev (its choose_tune_teacher)
    teacher_wd: float
    student_epochs: int               # 1x = study 1's budget (16 epochs over L)
    multiple: int                     # the budget of questions 1, 3 and 4
    long_multiple: int                # question 2's
    batch_size: int
    views: tuple[int, ...]            # stored views per image (question 1)
    k_main: int                       # select-topk K per class (question 3)
    ssld_grid: tuple[tuple[float, float], ...]  # (lr, wd) per record set, on dev
    temperatures: tuple[float, ...]   # question 4
    budget_hours: float               # driver time of all sittings (the 9x rows' rule)
    min_points: float = 0.005         # the "clear" rule's floor (a fraction of top-1)
    seeds: tuple[int, ...] = (0, 1, 2)
    dedup_threshold: float = 0.8
    dedup_max_pairs: int = 2000


SCALES = {
    # every step once on a few hundred images; its numbers show nothing, and its budget lets
    # every 9x seed run
    "smoke": Scale3(labeled_per_class=30, extra_per_class=60, pool_size=600, dev_per_class=3,
                    val_per_class=50, teacher_epochs=2, teacher_lr=0.4, teacher_wd=5e-4,
                    student_epochs=1, multiple=3, long_multiple=9, batch_size=32, views=(4, 16),
                    k_main=10, ssld_grid=((0.8, 5e-5), (1.6, 5e-5)), temperatures=(1.0, 4.0),
                    budget_hours=1000.0, dedup_max_pairs=100),
    "full": Scale3(labeled_per_class=None, extra_per_class=1800, pool_size=30000,
                   dev_per_class=60, val_per_class=None, teacher_epochs=10, teacher_lr=0.4,
                   teacher_wd=5e-4, student_epochs=16, multiple=3, long_multiple=9,
                   batch_size=128, views=(4, 16), k_main=1000,
                   ssld_grid=((0.8, 5e-5), (1.6, 5e-5), (3.2, 5e-5)),
                   temperatures=(1.0, 4.0), budget_hours=10.0),
}


# ----------------------------------------------------------------------------------------------
# pure functions (tested in tests/test_fashion_mnist_3.py)


def cells(sc: Scale3) -> list[tuple[str, int]]:
    """Question 1's (record set, views) cells, cheapest first: the order ties go by."""
    return [(rs, v) for v in sc.views for rs in RECORD_SETS]


def cell_name(rs: str, views: int) -> str:
    return f"{rs}_v{views}"


def compare(a: list[float], b: list[float], min_points: float) -> dict:
    """The declared rule: A differs clearly from B when |mean A - mean B| exceeds
    max(min_points, 2 standard errors of the difference), SE = sqrt(s_a^2/n_a + s_b^2/n_b)
    with sample stds. With one seed on a side its std is unknown: no verdict (``clear``
    None)."""
    d = statistics.fmean(a) - statistics.fmean(b)
    out = {"diff": d, "n": [len(a), len(b)]}
    if len(a) < 2 or len(b) < 2:
        return out | {"se": None, "bar": None, "clear": None}
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    bar = max(min_points, 2 * se)
    return out | {"se": se, "bar": bar, "clear": abs(d) > bar}


def gap_change(long_a: list[float], long_b: list[float], short_a: list[float],
               short_b: list[float], min_points: float) -> dict:
    """Question 2's rule: the gap A - B at the long budget minus the gap at the short one,
    clear when it exceeds max(min_points, 2 SE), SE the root of the two gaps' squared SEs."""
    long, short = compare(long_a, long_b, min_points), compare(short_a, short_b, min_points)
    d = long["diff"] - short["diff"]
    if long["se"] is None or short["se"] is None:
        return {"diff": d, "long": long, "short": short, "se": None, "bar": None, "clear": None}
    se = math.hypot(long["se"], short["se"])
    bar = max(min_points, 2 * se)
    return {"diff": d, "long": long, "short": short, "se": se, "bar": bar, "clear": abs(d) > bar}


def best_cells(top1: dict[tuple[str, int], list[float]], order: list[tuple[str, int]]) -> dict:
    """The cell of question 1 with the highest mean top-1 (``best``, for question 3), and the
    best cell whose records are augmented (``best_augmented``, for question 2); ties go to the
    cell earlier in ``order`` (the cheaper)."""
    def top(candidates):
        return max(candidates, key=lambda c: (statistics.fmean(top1[c]), -order.index(c)))
    return {"best": top(order), "best_augmented": top([c for c in order if c[0] != "crop"])}


def x9_seeds(budget_s: float, used_s: float, run_s: float, jobs: int, max_seeds: int) -> int:
    """Seeds of question 2 that fit the budget: each seed is two runs (the best augmented set
    and crop-only) of ``run_s`` seconds, ``jobs`` at a time."""
    if run_s <= 0:
        raise ValueError(f"run_s must be > 0, got {run_s}")
    left = max(0.0, budget_s - used_s)
    return min(max_seeds, int(left * jobs // (2 * run_s)))


def selection_keys(rows: list[tuple[str, Optional[int]]]) -> list[tuple[str, None]]:
    """The selected pool images as a list without labels: the teacher's top-1 that
    ``select-topk --list-out`` writes beside each key is not a label, and U stays unlabelled."""
    return [(key, None) for key, _ in rows]


# ----------------------------------------------------------------------------------------------
# internal steps


def check_splits(ctx: Context) -> dict:
    """The prepared lists and the splits must be study 2's (full scale): the same L, dev, T,
    U and V, by the sha256 of their list files in study 2's results."""
    ours = {"prepare": ctx.result("prepare")["sha256"], "splits": ctx.result("splits")["sha256"]}
    if ctx.args.scale != "full":
        return {"compared": False, "why": f"scale {ctx.args.scale}: study 2 recorded full only"}
    steps = read_json(STUDY2_RESULTS)["steps"]
    for step, hashes in ours.items():
        theirs = steps[step]["result"]["sha256"]
        wrong = sorted(k for k in theirs if hashes.get(k) != theirs[k])
        if wrong:
            raise RuntimeError(f"{step}: list files {', '.join(wrong)} differ from study 2's "
                               f"({STUDY2_RESULTS}); this study runs on study 2's splits")
    return {"compared": True, "equal": True, "study2": str(STUDY2_RESULTS.name)}


# this study's step -> study 2's steps that ran the same command (paths aside)
STUDY2_TWINS = {"teacher_T3_s0": ("teacher_T3_s0", "teacher_T_s0"),
                "eval_teacher_T3_s0": ("eval_teacher_T3_s0", "eval_teacher_T_s0"),
                "tune_teacher": ("tune_teacher_1",),
                "inspect_dev_crop": ("inspect_dev_Ltrain",),
                "tune_ssld_crop_0": ("tune_ssld_2",), "tune_ssld_crop_1": ("tune_ssld_3",),
                "inspect_L_crop_v4": ("inspect_L3", "inspect_L")}


def check_study2(ctx: Context) -> dict:
    """Report only: whether the steps that repeat study 2's commands reproduced its records
    (``record.differences``: exact, volatile fields aside). Study 2 recorded its teacher T on
    AVX-512 and T3 on AVX2 machines: the same command, two results (its amendment 1b)."""
    if ctx.args.scale != "full":
        return {"compared": False, "why": f"scale {ctx.args.scale}"}
    steps = read_json(STUDY2_RESULTS)["steps"]
    out: dict[str, dict] = {}
    for ours, twins in STUDY2_TWINS.items():
        if ours not in ctx.results:
            continue
        mine = {k: v for k, v in ctx.result(ours).items() if k not in ("run", "data")}
        kind = ours.split("_", 1)[0]
        for twin in twins:
            theirs = (steps.get(twin) or {}).get("result")
            if theirs is None:
                out.setdefault(ours, {})[twin] = {"equal": None, "why": "not in the record"}
                continue
            theirs = {k: v for k, v in theirs.items() if k not in ("run", "data")}
            diffs = record.differences(theirs, mine, kind)
            out.setdefault(ours, {})[twin] = {"equal": not diffs, "differences": diffs[:6]}
    return {"compared": True, "steps": out}


def q1_top1(ctx: Context) -> dict[tuple[str, int], list[float]]:
    sc = ctx.scale
    return {(rs, v): [ctx.result(f"eval_ssld_L_{cell_name(rs, v)}_x{sc.multiple}_s{s}")["top1"]
                      for s in sc.seeds] for rs, v in cells(sc)}


def choose_best(ctx: Context) -> dict:
    """Question 1 finished: every cell's numbers, the declared comparisons with their
    verdicts, and the cells questions 2 and 3 continue with (README, "Choices")."""
    sc = ctx.scale
    top1 = q1_top1(ctx)
    order = cells(sc)
    chosen = best_cells(top1, order)
    comparisons = {}
    for v in sc.views:
        for a, b in (("ra", "crop"), ("mix", "crop"), ("mix", "ra")):
            comparisons[f"{a}_v{v} - {b}_v{v}"] = compare(top1[(a, v)], top1[(b, v)],
                                                          sc.min_points)
    lo, hi = min(sc.views), max(sc.views)
    for rs in RECORD_SETS:
        comparisons[f"{rs}_v{hi} - {rs}_v{lo}"] = compare(top1[(rs, hi)], top1[(rs, lo)],
                                                          sc.min_points)
    return {"cells": {cell_name(*c): {"top1": t, "mean": statistics.fmean(t),
                                      "std": statistics.stdev(t) if len(t) > 1 else None}
                      for c, t in top1.items()},
            "comparisons": comparisons,
            "best": {"records": chosen["best"][0], "views": chosen["best"][1]},
            "best_augmented": {"records": chosen["best_augmented"][0],
                               "views": chosen["best_augmented"][1]}}


def write_selection(ctx: Context, sel: str) -> dict:
    """``splits/Usel.txt``: the keys of the selected pool images (``selection_keys``)."""
    rows = selection_keys(read_list(ctx.stores / f"{sel}.txt"))
    path = Path(ctx.split("Usel"))
    write_list(path, rows)
    return {"rows": len(rows), "sha256": record.sha256_of(path)}


def used_seconds(ctx: Context) -> float:
    """Driver time of every sitting so far, from the results file the driver rewrites after
    each step (its ``sessions``)."""
    path = Path(ctx.args.results)
    if not path.exists():
        return 0.0
    return sum(float(s.get("wall_s") or 0.0) for s in read_json(path).get("sessions", []))


def budget_x9(ctx: Context) -> dict:
    """The drop rule of question 2 (README): how many seeds of its two 9x rows fit what is
    left of the budget, at the training throughput this study measured in question 1's runs
    of the same two cells (per job, two jobs at once). Reads times, never a top-1."""
    sc, best = ctx.scale, ctx.result("choose_best")["best_augmented"]
    n_l = ctx.result("inspect_L_crop_v4")["rows"]
    rates = {}
    for rs in (best["records"], "crop"):
        runs = [ctx.result(f"ssld_L_{cell_name(rs, best['views'])}_x{sc.multiple}_s{s}")
                for s in sc.seeds]
        rates[rs] = statistics.median(r["images_seen"] / r["train_seconds"] for r in runs)
    images = sc.long_multiple * sc.student_epochs * n_l
    run_s = images / min(rates.values()) + RUN_OVERHEAD_S
    used = used_seconds(ctx)
    seeds = x9_seeds(3600 * sc.budget_hours, used, run_s, ctx.args.jobs, len(sc.seeds))
    return {"seeds": seeds, "used_s": used, "budget_s": 3600 * sc.budget_hours,
            "run_s": run_s, "images_per_s": rates, "jobs": ctx.args.jobs,
            "cell": cell_name(best["records"], best["views"])}


def allow_x9(ctx: Context, seed_index: int) -> dict:
    result = ctx.result("budget_x9")
    if seed_index >= result["seeds"]:
        raise RuntimeError(
            f"seed {ctx.scale.seeds[seed_index]} of the 9x rows does not fit the budget: "
            f"{result['used_s'] / 3600:.2f} h of {result['budget_s'] / 3600:.1f} h spent, "
            f"{result['run_s'] / 3600:.2f} h per run; dropped by the README's rule")
    return {"seed": ctx.scale.seeds[seed_index]}


# ----------------------------------------------------------------------------------------------
# the protocol


def build_steps(ctx: Context) -> list[Step]:
    sc, T, S = ctx.scale, ctx.teacher, ctx.student
    steps: list[Step] = []
    add = steps.append
    E, M, X = sc.student_epochs, sc.multiple, sc.long_multiple
    K = sc.k_main
    n = study2.sizes(sc)
    n["Ttrain"] = n["T"] - n["dev"]
    ctx.work_est = {}  # step -> (rate key, images): the --estimate

    def est(name: str, rate: str, images: float) -> None:
        ctx.work_est[name] = (rate, images)

    # 0. data: study 2's prepared lists and splits, checked against its record -------------
    add(prepare_step())
    add(Step("splits", "split", deps=("prepare",), internal=study2.make_splits,
             outputs=lambda c: [Path(c.split(x)) for x in ("L", "T", "dev", "U", "V")]))
    add(Step("check_splits", "choose", deps=("splits",), internal=check_splits))

    # 1. teachers: T3 (study 2's command) and the tuning teacher (never sees dev) ----------
    def teacher(name: str, data: str, val: Optional[str] = None) -> None:
        add(train_step(name, deps=("check_splits",), group="teacher",
                       build=lambda c: train_command(
                           c, name, model=T, epochs=sc.teacher_epochs, lr=sc.teacher_lr,
                           wd=sc.teacher_wd, seed=0, warmup=1.0, data=c.split(data),
                           val=c.split(val) if val else None, extra=("--supervised",))))
        est(name, "teacher_train", sc.teacher_epochs * n[data])
        if val:
            est(name + ":val", "eval_teacher", sc.teacher_epochs * n[val])

    teacher("teacher_T3_s0", "T")
    teacher("tune_teacher", "Ttrain", val="dev")
    add(eval_step("eval_teacher_T3_s0", "teacher_T3_s0", T, group="teacher"))
    est("eval_teacher_T3_s0", "eval_teacher", n["V"])
    ckpt = {"T3": lambda c: str(c.run_dir("teacher_T3_s0") / "last.pt"),
            "tune": lambda c: str(c.run_dir("tune_teacher") / "last.pt")}

    def infer(name: str, store: str, data: str, views: int, teacher_run: str, deps=(),
              extra=(), embeddings: bool = False, records: str = "crop") -> None:
        add(infer_step(name, store, data, views=views, checkpoint=ckpt[teacher_run],
                       deps=(("teacher_T3_s0" if teacher_run == "T3" else "tune_teacher"),)
                       + tuple(deps), embeddings=embeddings, extra=extra))
        add(inspect_step(f"inspect_{store}", store, (name,)))
        est(name, "infer_1_view" if views == 1 else rate(records, "infer_4_views"),
            n[data] if views == 1 else n[data] * views / 4)

    def rate(rs: str, key: str = "ssld_train") -> str:
        return key if rs == "crop" else f"{key}_{rs}"

    # 2. the SSLD lr of each record set, on dev (stores of Ltrain by the tuning teacher) -----
    for rs, spec in RECORD_SETS.items():
        infer(f"infer_dev_{rs}", f"dev_{rs}", "Ltrain", TUNING_VIEWS, "tune", extra=spec.options,
              records=rs)
    for rs in RECORD_SETS:
        for name in tune_steps(add, f"tune_ssld_{rs}", S, sc.ssld_grid, E,
                               lambda c, rs=rs: {"stores": (c.store(f"dev_{rs}"),)},
                               (f"inspect_dev_{rs}",)):
            est(name, rate(rs), E * n["Ltrain"])
            est(name + ":val", "eval_student", E * n["dev"])

    # 3. T3's stores of L: every record set at every view count, and one with logits --------
    for v in sc.views:
        for rs, spec in RECORD_SETS.items():
            infer(f"infer_L_{cell_name(rs, v)}", f"L_{cell_name(rs, v)}", "L", v, "T3",
                  extra=spec.options, records=rs)
    infer("infer_L_logits", "L_logits", "L", TUNING_VIEWS, "T3", extra=("--store-logits",))
    add(Step("check_study2", "choose", internal=check_study2,
             deps=("eval_teacher_T3_s0", "tune_teacher", "inspect_dev_crop",
                   "choose_tune_ssld_crop", "inspect_L_crop_v4")))

    def student(name: str, group: str, *, records: Callable[[Context], str],
                store: Callable[[Context], str], multiple: int, seed: int,
                deps: tuple[str, ...], est_rate: str, extra: tuple[str, ...] = (),
                lr_scale: float = 1.0) -> None:
        """SSLD of the student from STORE at MULTIPLE x the budget (equal steps: epochs
        over a bigger store are scaled down), with the lr chosen on dev for RECORDS."""
        def build(c: Context) -> list[str]:
            chosen = c.result(f"choose_tune_ssld_{records(c)}")
            n_l = c.result("inspect_L_crop_v4")["rows"]  # one epoch over L sets the budget
            rows = c.result(f"inspect_{store(c)}")["rows"]
            return train_command(c, name, model=S,
                                 epochs=study2.equal_epochs(E * multiple, n_l, rows),
                                 lr=chosen["lr"] * lr_scale, wd=chosen["weight_decay"],
                                 seed=seed, warmup=n_l / rows, stores=(c.store(store(c)),),
                                 extra=extra)

        add(train_step(name, deps=deps + ("inspect_L_crop_v4",), build=build, group=group))
        add(eval_step(f"eval_{name}", name, S, group=group))
        est(name, est_rate, E * multiple * n["L"])
        est(f"eval_{name}", "eval_student", n["V"])

    def fixed(value: str) -> Callable[[Context], str]:
        return lambda c: value

    # 4. question 1: record sets x views at 3x, 3 seeds; 4 views first, seed by seed --------
    q1_evals = []
    for v in sc.views:
        for s in sc.seeds:
            for rs in RECORD_SETS:
                name = f"ssld_L_{cell_name(rs, v)}_x{M}_s{s}"
                student(name, f"ssld_L_{cell_name(rs, v)}_x{M}", records=fixed(rs),
                        store=fixed(f"L_{cell_name(rs, v)}"), multiple=M, seed=s,
                        deps=(f"choose_tune_ssld_{rs}", f"inspect_L_{cell_name(rs, v)}"),
                        est_rate=rate(rs))
                q1_evals.append(f"eval_{name}")

    # 5. question 4: KL at two temperatures from one store with logits, one seed -----------
    # the lr: crop-only's (chosen for JS) times JS's gradient scale over KL's, the package's
    # own rule for its default lr (student_train.config.default_lr); KL is scaled by T^2
    kl_scale = LOSS_SPECS["js"].gradient_scale / LOSS_SPECS["kl"].gradient_scale
    q4_evals = []
    for t in sc.temperatures:
        name = f"kl_L_logits_t{t:g}_x{M}_s0"
        student(name, f"kl_L_logits_t{t:g}_x{M}", records=fixed("crop"),
                store=fixed("L_logits"), multiple=M, seed=0,
                deps=("choose_tune_ssld_crop", "inspect_L_logits"), est_rate="ssld_train",
                extra=("--loss", "kl", "--temperature", f"{t:g}"), lr_scale=kl_scale)
        q4_evals.append(f"eval_{name}")

    add(Step("choose_best", "choose", deps=tuple(q1_evals), internal=choose_best))

    def best(key: str) -> Callable[[Context], dict]:
        return lambda c: c.result("choose_best")[key]

    best_all, best_aug = best("best"), best("best_augmented")

    # 6. question 3: L + the top-K/class of U, both with the best cell's records -----------
    # U is selected on view 0 (the evaluation crop, never augmented) of a one-view pass, and
    # only the selected images are labelled with the chosen records (README, question 3)
    infer("infer_U_v1", "U_v1", "U", 1, "T3", embeddings=True)
    infer("infer_V_v1", "V_v1", "V", 1, "T3", embeddings=True)
    dups = dedup_steps(add, "", "U_v1", "V_v1", sc.dedup_threshold)
    est("dedup", "sift_pairs", min(sc.dedup_max_pairs, n["V"]))
    sel = select_steps(add, f"top{K}", "U_v1", lambda c: K, ("dedup", dups))
    add(Step("usel_list", "select", deps=(f"select_{sel}",),
             internal=lambda c: write_selection(c, sel),
             outputs=lambda c: [Path(c.split("Usel"))]))
    add(Step("pseudo_label_check", "labels", deps=(f"select_{sel}",),
             internal=lambda c: pseudo_label_check(c, [sel])))
    add(infer_step("infer_Usel", "Usel", "Usel", views=lambda c: best_all(c)["views"],
                   checkpoint=ckpt["T3"], deps=("teacher_T3_s0", "usel_list", "choose_best"),
                   extra=lambda c: RECORD_SETS[best_all(c)["records"]].options))
    add(inspect_step("inspect_Usel", "Usel", ("infer_Usel",)))
    est("infer_Usel", "infer_4_views_mix", 10 * K * max(sc.views) / 4)  # the slowest

    def best_store(c: Context) -> str:
        return f"L_{cell_name(best_all(c)['records'], best_all(c)['views'])}"

    # a step that reads a chosen store waits for every candidate: on a fresh machine the
    # driver then recomputes the store it reads (experiments/record.py)
    def inspects(records=RECORD_SETS) -> tuple[str, ...]:
        return tuple(f"inspect_L_{cell_name(rs, v)}" for v in sc.views for rs in records)

    merged = merge_steps(add, best_store, "Usel",
                         ("choose_best", "inspect_Usel") + inspects(), out="Lbest+Usel")
    q3_evals = []
    for s in sc.seeds:
        name = f"ssld_L+U_best_x{M}_s{s}"
        student(name, f"ssld_L+U_best_x{M}", records=lambda c: best_all(c)["records"],
                store=fixed(merged), multiple=M, seed=s,
                deps=("choose_best", f"inspect_{merged}"), est_rate="ssld_train_mix")
        q3_evals.append(f"eval_{name}")

    # 7. question 2: the best augmented cell against crop-only at 9x, as many seeds as fit --
    add(Step("budget_x9", "choose", internal=budget_x9,
             deps=("choose_best",) + tuple(q3_evals) + tuple(q4_evals)))
    for i, s in enumerate(sc.seeds):
        add(Step(f"allow_x9_s{s}", "choose", deps=("budget_x9",),
                 internal=lambda c, i=i: allow_x9(c, i)))
        student(f"ssld_L_best_x{X}_s{s}", f"ssld_L_best_x{X}",
                records=lambda c: best_aug(c)["records"],
                store=lambda c: f"L_{cell_name(best_aug(c)['records'], best_aug(c)['views'])}",
                multiple=X, seed=s, deps=(f"allow_x9_s{s}",) + inspects(("ra", "mix")),
                est_rate="ssld_train_mix")
        student(f"ssld_L_crop_x{X}_s{s}", f"ssld_L_crop_x{X}", records=fixed("crop"),
                store=lambda c: f"L_{cell_name('crop', best_aug(c)['views'])}",
                multiple=X, seed=s, deps=(f"allow_x9_s{s}",) + inspects(("crop",)),
                est_rate="ssld_train")
    return steps


def row_spec(ctx: Context) -> list[dict]:
    """The report's rows: one per setup, with its train/eval steps (one per seed).
    ``records``/``views`` name a question-1 cell, or the choice (``best``: the best cell;
    ``best_augmented``) that ``choose_best`` records."""
    sc, T, S = ctx.scale, ctx.teacher, ctx.student
    M, X, K = sc.multiple, sc.long_multiple, sc.k_main

    def row(group: str, label: str, data: str, seeds, multiple: Optional[int], *,
            records: Optional[str], views: Optional[int], question: str, note: str = "",
            model: str = S) -> dict:
        prefix, suffix = (group.rsplit("_x", 1)[0], f"_x{multiple}") if multiple else (group, "")
        return {"group": group, "label": label, "model": model, "data": data,
                "teacher": "-" if model == T else "T3", "multiple": multiple,
                "records": records, "views": views, "question": question, "note": note,
                "train_steps": [f"{prefix}{suffix}_s{s}" for s in seeds],
                "eval_steps": [f"eval_{prefix}{suffix}_s{s}" for s in seeds]}

    seeds = list(sc.seeds)
    rows = [row("teacher_T3", f"teacher {T} on T (study 2's T3 command)", "T", [0], None,
                records=None, views=None, question="teacher", model=T)]
    for rs, v in cells(sc):
        rows.append(row(f"ssld_L_{cell_name(rs, v)}_x{M}", f"SSLD on L, {RECORD_SETS[rs].label}"
                        f", {v} views", "L", seeds, M, records=rs, views=v, question="1"))
    for t in sc.temperatures:
        rows.append(row(f"kl_L_logits_t{t:g}_x{M}", f"KL at T = {t:g} from stored logits, "
                        f"crop only, {TUNING_VIEWS} views", "L", [0], M, records="crop",
                        views=TUNING_VIEWS, question="4", note="one seed: a side row"))
    rows.append(row(f"ssld_L+U_best_x{M}", f"SSLD on L + top-{K}/class of U, the best cell's "
                    "records", f"L + U_top{K}", seeds, M, records="best", views=None,
                    question="3", note="equal steps"))
    rows.append(row(f"ssld_L_best_x{X}", "SSLD on L, the best augmented cell", "L", seeds, X,
                    records="best_augmented", views=None, question="2",
                    note="seeds: as many as fit the budget (budget_x9)"))
    rows.append(row(f"ssld_L_crop_x{X}", "SSLD on L, crop only at the best augmented cell's "
                    "views", "L", seeds, X, records="crop", views=None, question="2",
                    note="seeds: as many as fit the budget (budget_x9)"))
    return rows


def estimate(ctx: Context, steps: list[Step]) -> driver.Estimate:
    """Seconds per part at the MEASURED rates (study 1's, or --rates: study 2's file), one
    step at a time, of the work ``build_steps`` put in ``ctx.work_est``; the augmented
    record sets train and infer at ``SPEED`` x crop-only's rate."""
    rates = read_json(Path(ctx.args.rates)) if ctx.args.rates else {}
    m = dict(MEASURED) | rates
    for key, speeds in SPEED.items():
        for rs, speed in speeds.items():
            m.setdefault(f"{key}_{rs}", m[key] * speed)
    parts: dict[str, float] = {}

    def part(name: str) -> str:
        if name in ("teacher_T3_s0", "tune_teacher", "eval_teacher_T3_s0"):
            return "0. teachers: T3 on T, the tuning teacher on Ttrain (10 epochs each)"
        if name.startswith(("infer_dev_", "tune_ssld_")):
            return "1. lr grids on dev (3 record sets x 3 lrs, 1x on Ltrain) + their stores"
        if name.startswith("infer_L_"):
            return "2. T3's stores of L (3 record sets x 4 and 16 views, + logits)"
        q1 = f"_x{ctx.scale.multiple}_"
        if name.startswith(("ssld_L_", "eval_ssld_L_")) and q1 in name:
            views = int(name.split("_v", 1)[1].split("_", 1)[0])
            return f"3{'ab'[ctx.scale.views.index(views)]}. question 1, {views} views " \
                f"(9 runs at {ctx.scale.multiple}x)"
        if name.startswith(("kl_", "eval_kl_")):
            return "4. question 4: temperature (2 runs at 3x, one seed)"
        if name.startswith(("ssld_L+U", "eval_ssld_L+U", "infer_U", "infer_V", "dedup",
                            "infer_Usel")):
            return "5. question 3: U's pipeline + L + U (3 runs at 3x)"
        return "6. question 2: the 9x rows (2 rows x 3 seeds)"

    for name, (key, images) in ctx.work_est.items():
        p = part(name.split(":")[0])
        parts[p] = parts.get(p, 0.0) + images / m[key]
    parts = dict(sorted(parts.items()))
    parts["process start-ups"] = sum(s.command is not None for s in steps) * m["startup_s"]
    return driver.Estimate(parts, rates.get("two_jobs_speedup", MEASURED["two_jobs_speedup"]))


STUDY = driver.Study(
    name="Fashion-MNIST study 3: does replayed augmentation make stored labels a better "
         "teacher? (issue 27)",
    description=__doc__.split("\n\n")[0], scales=SCALES, build=build_steps, rows=row_spec,
    estimate=estimate, results_dir=HERE / "results", teacher=TEACHER, student=STUDENT,
    constants={"input_size": INPUT_SIZE}, options=study2.options,
    extra=lambda c: {"protocol": 3, "record_sets": {k: list(v.options)
                                                    for k, v in RECORD_SETS.items()}})


def main(argv: Optional[list[str]] = None) -> int:
    return driver.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(main())
