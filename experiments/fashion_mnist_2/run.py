#!/usr/bin/env python3
"""Study 2 on Fashion-MNIST (issue 16): when do teacher-selected unlabeled images help?

The protocol as steps for the study driver (``experiments/driver.py``), built from the shared
step builders (``experiments/steps.py``): only its splits, steps, gate and table are here.
Protocol, run time and how to resume: ``README.md`` next to this file.

    python experiments/fashion_mnist_2/run.py --workdir /work/fm2/full --scale full \\
        --src /usr/share/datasets/fashion-mnist

Resumable exactly as study 1 (state files, ``train-student --resume``), and across sittings
on fresh machines from the committed results file (``experiments/record.py``): run the same
command again. The steps curve comes first; the ``gate`` step then applies the rule declared in the
README and, when SSLD on L has not flattened by 9x the study-1 budget, fails on purpose, which
stops every later step (the issue: "say so and stop there").
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: the checkout's `experiments` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import driver  # noqa: E402
from experiments.driver import Context, Step, read_json, write_json  # noqa: E402
from experiments.steps import (  # noqa: E402
    DEV_SEED, INPUT_SIZE, MEASURED, STUDENT, TEACHER, VIEWS, eval_step, infer_step,
    inspect_step, list_hashes, per_class, prepare_step, pseudo_label_check, read_list,
    select_merge_steps, train_command, train_step, tune_steps, write_list)
from experiments.steps import dedup_steps as shared_dedup_steps  # noqa: E402

HERE = Path(__file__).resolve().parent
SPLIT_SEED = 20261201  # draws T's extra images and U from the prepared pool
# amendment 2 (README): the seeds of ssld_L3_default_x3 run with the old default lr (0.1);
# train-student's default for --loss js changed to 0.4 before seed 2 could run
OLD_DEFAULT_SEEDS = (0, 1)


@dataclass(frozen=True)
class Scale2:
    """Sizes of one run of protocol 2. ``None`` means "all of it"."""

    labeled_per_class: Optional[int]  # L, of the prepared 600/class (None: study 1's L)
    extra_per_class: int              # T = L + this many labelled pool images per class
    pool_size: int                    # U: drawn at random from the rest of the pool
    dev_per_class: int                # dev split of L: hyper-parameters only
    val_per_class: Optional[int]      # V
    teacher_epochs: int               # the teacher on T (tuned on dev)
    short_teacher_epochs: int         # the same teacher with fewer epochs (teacher table)
    bridge_epochs: int                # study 1's teacher on L: its recipe, chosen on the
    bridge_lr: float                  # same dev split in study 1 (docs/results.md)
    bridge_wd: float
    student_epochs: int               # 1x = study 1's budget (16 epochs over L)
    multiples: tuple[int, ...]        # the steps curve: budgets in multiples of 1x
    side_multiple: int                # the budget of the one-seed side rows
    batch_size: int
    k_main: int                       # select-topk K per class
    teacher_grid: tuple[tuple[float, float], ...]
    label_grid: tuple[tuple[float, float], ...]
    ssld_grid: tuple[tuple[float, float], ...]
    flat_points: float                # the gate's minimum gain 3x -> 9x (fraction of top-1)
    seeds: tuple[int, ...] = (0, 1, 2)
    dedup_threshold: float = 0.8
    dedup_max_pairs: int = 2000


SCALES = {
    # every step once on a few hundred images; its numbers show nothing, and its gate always
    # passes (flat_points = 1) so that the steps after it run too
    "smoke": Scale2(labeled_per_class=30, extra_per_class=60, pool_size=600, dev_per_class=3,
                    val_per_class=50, teacher_epochs=2, short_teacher_epochs=1,
                    bridge_epochs=2, bridge_lr=0.4, bridge_wd=5e-4, student_epochs=1,
                    multiples=(1, 3, 9), side_multiple=3, batch_size=32, k_main=10,
                    teacher_grid=((0.1, 5e-4), (0.4, 5e-4)),
                    label_grid=((0.1, 5e-5), (0.4, 5e-5)),
                    ssld_grid=((0.1, 5e-5), (0.4, 5e-5)), flat_points=1.0,
                    dedup_max_pairs=100),
    "full": Scale2(labeled_per_class=None, extra_per_class=1800, pool_size=30000,
                   dev_per_class=60, val_per_class=None, teacher_epochs=10,
                   short_teacher_epochs=2, bridge_epochs=15, bridge_lr=0.4, bridge_wd=5e-4,
                   student_epochs=16, multiples=(1, 3, 9), side_multiple=3, batch_size=128,
                   k_main=1000, teacher_grid=((0.1, 5e-4), (0.4, 5e-4)),
                   # widened by one point at each end after the first grid's optimum fell on
                   # its edge (label-only 0.05, SSLD 0.8; dev numbers only): README, step 1
                   label_grid=((0.05, 5e-5), (0.1, 5e-5), (0.4, 5e-5), (0.025, 5e-5)),
                   ssld_grid=((0.1, 5e-5), (0.4, 5e-5), (0.8, 5e-5), (1.6, 5e-5)),
                   flat_points=0.005),
}


# ----------------------------------------------------------------------------------------------
# pure functions (tested in tests/test_fashion_mnist_2.py)


def make_split_lists(labeled, pool, hidden: dict[str, int], val, sc: Scale2) -> dict[str, list]:
    """The study's sets as (key, label or None) lists.

    L and dev are drawn exactly as study 1 draws them (same rng, same order), so that L, dev
    and Ltrain are study 1's. T = L + ``extra_per_class`` images per class of the prepared
    pool, with their labels (T is labelled in this study); U = ``pool_size`` of the remaining
    pool images, drawn without looking at their labels; the rest is unused.
    """
    rng = random.Random(DEV_SEED)
    L = per_class(labeled, sc.labeled_per_class, rng)
    dev = per_class(L, sc.dev_per_class, rng)
    dev_keys = {k for k, _ in dev}
    ltrain = [row for row in L if row[0] not in dev_keys]
    V = per_class(val, sc.val_per_class, rng)
    rng2 = random.Random(SPLIT_SEED)
    labelled_pool = [(k, hidden[k]) for k, _ in pool]
    extra = per_class(labelled_pool, sc.extra_per_class, rng2)
    extra_keys = {k for k, _ in extra}
    rest = [k for k, _ in pool if k not in extra_keys]
    if sc.pool_size > len(rest):
        raise SystemExit(f"U of {sc.pool_size} asked, {len(rest)} pool images left after T")
    u_keys = sorted(rng2.sample(rest, sc.pool_size))
    u_set = set(u_keys)
    T = L + extra
    return {"L": L, "dev": dev, "Ltrain": ltrain, "T": T,
            "Ttrain": [row for row in T if row[0] not in dev_keys],
            "U": [(k, None) for k in u_keys], "U_hidden": [(k, hidden[k]) for k in u_keys],
            "unused": [(k, None) for k in rest if k not in u_set], "V": V}


def plateau(curve: dict[int, list[float]], multiples: tuple[int, ...], min_gain: float) -> dict:
    """The gate's rule: SSLD on L has flattened when the mean top-1 gain from the second
    largest to the largest budget is below ``max(min_gain, its standard error)``.

    ``curve`` maps a budget multiple to the top-1 of its seeds. The standard error is
    sqrt(s_a^2 / n_a + s_b^2 / n_b) with sample stds (0 with one seed).
    """
    def ms(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    stats = {m: ms(curve[m]) for m in multiples}
    gains = {f"{a}x->{b}x": stats[b][0] - stats[a][0] for a, b in zip(multiples, multiples[1:])}
    a, b = multiples[-2], multiples[-1]
    se = math.sqrt(stats[a][1] ** 2 / len(curve[a]) + stats[b][1] ** 2 / len(curve[b]))
    gain = stats[b][0] - stats[a][0]
    bar = max(min_gain, se)
    return {"mean": {f"{m}x": stats[m][0] for m in multiples},
            "std": {f"{m}x": stats[m][1] for m in multiples},
            "seeds": {f"{m}x": len(curve[m]) for m in multiples}, "gains": gains,
            "last_gain": gain, "last_gain_se": se, "bar": bar, "flattened": gain < bar}


def equal_epochs(epochs_on_L: int, n_L: int, n_set: int) -> int:
    """Epochs over a set of ``n_set`` images with (about) the steps of ``epochs_on_L`` over L."""
    return max(1, math.floor(epochs_on_L * n_L / n_set + 0.5))


# ----------------------------------------------------------------------------------------------
# the protocol


def make_splits(ctx: Context) -> dict:
    sc = ctx.scale
    lists = make_split_lists(read_list(ctx.data / "labeled.txt"),
                             read_list(ctx.data / "pool.txt"),
                             dict(read_list(ctx.data / "pool_labels.txt")),
                             read_list(ctx.data / "val.txt"), sc)
    for name, rows in lists.items():
        write_list(Path(ctx.split(name)), rows)
    return {name: len(rows) for name, rows in lists.items()} | {
        "dev_seed": DEV_SEED, "split_seed": SPLIT_SEED} | list_hashes(ctx, lists)


def gate(ctx: Context) -> dict:
    sc = ctx.scale
    labels = {m: [ctx.result(f"eval_label_only_x{m}_s{s}")["top1"] for s in sc.seeds]
              for m in sc.multiples}
    result = curve_summary(ctx)
    result["label_only"] = plateau(labels, sc.multiples, sc.flat_points)
    write_json(ctx.work / "gate.json", result)
    if not result["flattened"]:
        raise RuntimeError(
            f"SSLD on L has not flattened by {sc.multiples[-1]}x: +{100 * result['last_gain']:.2f}"
            f" points from {sc.multiples[-2]}x (bar {100 * result['bar']:.2f}); the protocol "
            f"stops here (issue 16). Numbers: {ctx.work / 'gate.json'}")
    return result


def curve_summary(ctx: Context) -> dict:
    """The gate's numbers without its verdict: the step amendment 1's rows wait for."""
    sc = ctx.scale
    curve = {m: [ctx.result(f"eval_ssld_L_x{m}_s{s}")["top1"] for s in sc.seeds]
             for m in sc.multiples}
    return plateau(curve, sc.multiples, sc.flat_points)


def build_steps(ctx: Context) -> list[Step]:
    sc, T, S = ctx.scale, ctx.teacher, ctx.student
    steps: list[Step] = []
    add = steps.append
    E = sc.student_epochs
    ctx.work_est = {}  # step -> (rate key of MEASURED, images): the --estimate

    def est(name: str, rate: str, images: float) -> None:
        ctx.work_est[name] = (rate, images)

    n = sizes(sc)

    add(prepare_step())
    add(Step("splits", "split", deps=("prepare",), internal=make_splits,
             outputs=lambda c: [Path(c.split(x)) for x in ("L", "T", "dev", "U", "V")]))

    def hp(c: Context, which: str) -> tuple[float, float]:
        chosen = c.result(f"choose_{which}")
        return chosen["lr"], chosen["weight_decay"]

    def tune(prefix: str, model: str, grid, epochs: int, extra: Callable[[Context], dict],
             deps: tuple[str, ...], rate: str, n_train: int) -> None:
        for name in tune_steps(add, prefix, model, grid, epochs, extra, deps):
            est(name, rate, epochs * n_train)
            est(name + ":val", "eval_teacher" if model == T else "eval_student",
                epochs * n["dev"])

    # 1. hyper-parameters on dev: the students on L minus dev (label-only first: minutes, and
    # they measure the student's throughput early), the teacher on T minus dev ---------------
    tune("tune_label_only", S, sc.label_grid, E,
         lambda c: {"data": c.split("Ltrain"), "extra": ("--supervised",)}, ("splits",),
         "student_train", n["Ltrain"])
    tune("tune_teacher", T, sc.teacher_grid, sc.teacher_epochs,
         lambda c: {"data": c.split("Ttrain"), "extra": ("--supervised",)}, ("splits",),
         "teacher_train", n["T"] - n["dev"])

    def teacher(name: str, data: str, epochs: int, deps: tuple[str, ...],
                lr_wd: Callable[[Context], tuple[float, float]]) -> None:
        add(train_step(name, deps=deps, group="teacher",
                       build=lambda c: train_command(
                           c, name, model=T, epochs=epochs, lr=lr_wd(c)[0], wd=lr_wd(c)[1],
                           seed=0, warmup=1.0, data=c.split(data), extra=("--supervised",))))
        add(eval_step(f"eval_{name}", name, T, group="teacher"))
        est(name, "teacher_train", epochs * n[data])
        est(f"eval_{name}", "eval_teacher", n["V"])

    teacher("teacher_T_s0", "T", sc.teacher_epochs, ("choose_tune_teacher",),
            lambda c: hp(c, "tune_teacher"))
    ckpt = {"T": lambda c: str(c.run_dir("teacher_T_s0") / "last.pt"),
            "tshort": lambda c: str(c.run_dir("teacher_Tshort_s0") / "last.pt"),
            "bridge": lambda c: str(c.run_dir("teacher_L_s0") / "last.pt")}

    def infer(name: str, store: str, data: str, views: int, checkpoint, deps,
              embeddings: bool = False) -> None:
        add(infer_step(name, store, data, views=views, checkpoint=checkpoint, deps=deps,
                       embeddings=embeddings))
        add(inspect_step(f"inspect_{store}", store, (name,)))
        est(name, "infer_4_views" if views > 1 else "infer_1_view", n[data])

    # the SSLD student's lr is chosen with the best tuning teacher (it never saw dev)
    infer("infer_dev", "dev_Ltrain", "Ltrain", VIEWS,
          lambda c: str(c.run_dir(c.result("choose_tune_teacher")["chosen"]) / "last.pt"),
          ("choose_tune_teacher",))
    tune("tune_ssld", S, sc.ssld_grid, E, lambda c: {"stores": (c.store("dev_Ltrain"),)},
         ("inspect_dev_Ltrain",), "ssld_train", n["Ltrain"])
    infer("infer_L", "L", "L", VIEWS, ckpt["T"], ("teacher_T_s0",))

    # 2. students: one architecture, the budget in multiples of study 1's 16 epochs over L -----
    def student(name: str, *, group: str, multiple: int, deps: tuple[str, ...], seed: int,
                store: Optional[str] = None, supervised: bool = False,
                defaults: bool = False, l_store: str = "L") -> None:
        def L_rows(c: Context) -> int:  # the steps of one epoch over L set the budget
            return c.result(f"inspect_{l_store}")["rows"]

        def build(c: Context) -> list[str]:
            if defaults:  # train-student's own lr and weight decay
                lr, wd = None, None
            else:
                lr, wd = hp(c, "tune_label_only" if supervised else "tune_ssld")
            epochs, warmup = E * multiple, 1.0
            kwargs: dict[str, Any] = {}
            if store is None:
                kwargs["data"] = c.split("L")
            else:
                kwargs["stores"] = (c.store(store),)
                rows = c.result(f"inspect_{store}")["rows"]
                epochs = equal_epochs(E * multiple, L_rows(c), rows)
                warmup = L_rows(c) / rows  # one L-epoch's steps, in epochs of this set
            return train_command(c, name, model=S, epochs=epochs, lr=lr, wd=wd, seed=seed,
                                 warmup=warmup, extra=("--supervised",) if supervised else (),
                                 **kwargs)

        inspects = tuple(dict.fromkeys((f"inspect_{l_store}", f"inspect_{store}"))) \
            if store else ()  # label-only: none
        add(train_step(name, deps=deps + inspects, build=build, group=group))
        add(eval_step(f"eval_{name}", name, S, group=group))
        rate = "student_train" if supervised else "ssld_train"
        est(name, rate, E * multiple * n["L"])  # equal steps: the images of E x m epochs of L
        est(f"eval_{name}", "eval_student", n["V"])

    tuned = ("choose_tune_label_only", "choose_tune_ssld")
    longest_first = sorted(sc.multiples, reverse=True)
    for m in longest_first:  # the steps curve: SSLD on L (T's labels), then label-only
        for s in sc.seeds:
            student(f"ssld_L_x{m}_s{s}", group=f"ssld_L_x{m}", multiple=m, deps=tuned,
                    seed=s, store="L")
    for m in longest_first:
        for s in sc.seeds:
            student(f"label_only_x{m}_s{s}", group=f"label_only_x{m}", multiple=m,
                    deps=tuned, seed=s, supervised=True)
    curve_evals = tuple(f"eval_{kind}_x{m}_s{s}" for kind in ("ssld_L", "label_only")
                        for m in sc.multiples for s in sc.seeds)
    add(Step("gate", "choose", internal=gate, deps=curve_evals))
    G = ("gate",)
    # amendment 1 (README, declared in sitting 3 before any of its numbers): the defaults
    # question does not need a plateau; its rows wait for the finished curve, not the gate
    add(Step("curve", "choose", internal=curve_summary, deps=curve_evals))
    C = ("curve",)

    # 3. after the gate: U's labels, dedup against V, selection, the other teachers ---------
    infer("infer_U", "U", "U", VIEWS, ckpt["T"], G + ("teacher_T_s0",), embeddings=True)
    infer("infer_V", "V", "V", 1, ckpt["T"], G + ("teacher_T_s0",), embeddings=True)
    def dedup_steps(tag: str, pool_store: str, query_store: str) -> Callable[[Context], Path]:
        """Dedup of POOL_STORE against QUERY_STORE (``steps.dedup_steps``); returns the
        duplicates list's path."""
        dups = shared_dedup_steps(add, tag, pool_store, query_store, sc.dedup_threshold)
        ctx.work_est[f"dedup{tag}"] = ("sift_pairs", min(sc.dedup_max_pairs, n["V"]))
        return dups

    dups = dedup_steps("", "U", "V")

    def select_merge(tag: str, pool_store: str, labeled_store: str, k_of,
                     dedup: tuple[str, Callable[[Context], Path]] = ("dedup", dups)) -> str:
        """select-topk on POOL_STORE (dedup's duplicates excluded), merged with L's store."""
        return select_merge_steps(add, tag, pool_store, labeled_store, k_of, dedup)

    K = sc.k_main
    main = select_merge(f"top{K}", "U", "L", lambda c: K)
    all_u = select_merge("all", "U", "L", lambda c: c.result("inspect_U")["rows"])
    add(Step("pseudo_label_check", "labels", deps=("select_U_all", f"select_U_top{K}"),
             internal=lambda c: pseudo_label_check(c, [f"U_top{K}", "U_all"])))
    add(eval_step("eval_teacher_T_s0_on_U", "teacher_T_s0", T, data="U_hidden", group="report"))
    est("eval_teacher_T_s0_on_U", "eval_teacher", n["U"])

    # 4. L vs L + U at every budget of the curve (3 seeds) ---------------------------------
    X = sc.side_multiple
    for m in longest_first:
        for s in sc.seeds:
            student(f"ssld_L+U_x{m}_s{s}", group=f"ssld_L+U_x{m}", multiple=m, deps=tuned + G,
                    seed=s, store=main)
    # 5. side rows, one seed, at the side budget --------------------------------------------
    student(f"ssld_L+U_all_x{X}_s0", group=f"ssld_L+U_all_x{X}", multiple=X, deps=tuned + G,
            seed=0, store=all_u)
    # the teacher table: the same architecture at other accuracies, distilled on L
    # amendment 4: the short teacher and its student need no plateau: they wait for the curve
    teacher("teacher_Tshort_s0", "T", sc.short_teacher_epochs, C + ("choose_tune_teacher",),
            lambda c: hp(c, "tune_teacher"))
    teacher("teacher_L_s0", "L", sc.bridge_epochs, G, lambda c: (sc.bridge_lr, sc.bridge_wd))
    infer("infer_L_tshort", "L_tshort", "L", VIEWS, ckpt["tshort"], ("teacher_Tshort_s0",))
    student(f"ssld_L_tshort_x{X}_s0", group=f"ssld_L_tshort_x{X}", multiple=X, deps=tuned + C,
            seed=0, store="L_tshort", l_store="L_tshort")  # L's rows from its own store: T's
    # store of L is not rebuilt for it (T does not reproduce on every machine: amendment 1b)
    # the bridge: study 1's teacher (on L only) labels L and selects from U
    infer("infer_L_bridge", "L_bridge", "L", VIEWS, ckpt["bridge"], ("teacher_L_s0",))
    infer("infer_U_bridge", "U_bridge", "U", VIEWS, ckpt["bridge"], ("teacher_L_s0",))
    bridge = select_merge(f"top{K}", "U_bridge", "L_bridge", lambda c: K)
    for m in sorted({1, X}):
        student(f"ssld_L_bridge_x{m}_s0", group=f"ssld_L_bridge_x{m}", multiple=m,
                deps=tuned + G, seed=0, store="L_bridge")
    student(f"ssld_L+U_bridge_x{X}_s0", group=f"ssld_L+U_bridge_x{X}", multiple=X,
            deps=tuned + G, seed=0, store=bridge)
    # 6. defaults vs tuned: train-student's lr / weight decay, infer-teacher's one view ------
    infer("infer_L_v1", "L_v1", "L", 1, ckpt["T"], G + ("teacher_T_s0",))
    infer("infer_U_v1", "U_v1", "U", 1, ckpt["T"], G + ("teacher_T_s0",))
    main_v1 = select_merge(f"top{K}", "U_v1", "L_v1", lambda c: K)
    student(f"ssld_L_v1_x{X}_s0", group=f"ssld_L_v1_x{X}", multiple=X, deps=tuned + G,
            seed=0, store="L_v1")
    for m in sorted({1, X}, reverse=True):
        seeds = sc.seeds if m == X else sc.seeds[:1]
        for s in seeds:
            student(f"ssld_L_default_x{m}_s{s}", group=f"ssld_L_default_x{m}", multiple=m,
                    deps=G, seed=s, store="L_v1", defaults=True)
            student(f"ssld_L+U_default_x{m}_s{s}", group=f"ssld_L+U_default_x{m}", multiple=m,
                    deps=G, seed=s, store=main_v1, defaults=True)
        student(f"label_only_default_x{m}_s0", group=f"label_only_default_x{m}", multiple=m,
                deps=C, seed=0, supervised=True, defaults=True)
    amendment_teacher3(ctx, add, est, teacher, infer, student, dedup_steps, select_merge,
                       tuned + C, C)
    return steps


def js_default_lr(ctx: Context) -> dict:
    """The lr train-student resolves without --lr for --loss js: amendment 2's rows need the
    package whose default is 0.4 (a package before the change fails this step)."""
    from student_train.config import default_lr
    lr = default_lr("js", supervised=False)
    if abs(lr - 0.4) > 1e-12:
        raise RuntimeError(f"this package's default lr for --loss js is {lr}, amendment 2 "
                           "measures the default 0.4")
    return {"lr": lr}


def amendment_teacher3(ctx, add, est, teacher, infer, student, dedup_steps, select_merge,
                       tuned: tuple[str, ...], C: tuple[str, ...]) -> None:
    """Amendment 1b (README): the defaults rows measured from ``teacher_T3_s0``, the teacher on
    T recomputed on sitting 3's machine (sittings 1-2's did not reproduce there), with their
    tuned counterparts measured from the same teacher: no row of one teacher is compared with
    a row of another. Order: the rows on L first, then U's pipeline and the L + U rows."""
    sc, X, K = ctx.scale, ctx.scale.side_multiple, ctx.scale.k_main
    add(Step("js_default_lr", "choose", internal=js_default_lr))
    teacher("teacher_T3_s0", "T", sc.teacher_epochs, C + ("choose_tune_teacher",),
            lambda c: (c.result("choose_tune_teacher")["lr"],
                       c.result("choose_tune_teacher")["weight_decay"]))
    ck = lambda c: str(c.run_dir("teacher_T3_s0") / "last.pt")  # noqa: E731
    infer("infer_L3", "L3", "L", VIEWS, ck, ("teacher_T3_s0",))
    infer("infer_L3_v1", "L3_v1", "L", 1, ck, ("teacher_T3_s0",))
    on_l3 = {"l_store": "L3"}
    for s in sc.seeds:  # tuned and defaults on L at X, seed by seed
        student(f"ssld_L3_x{X}_s{s}", group=f"ssld_L3_x{X}", multiple=X, deps=tuned, seed=s,
                store="L3", **on_l3)
        if s in OLD_DEFAULT_SEEDS:  # the old default lr: amendment 2 changed it before seed 2
            student(f"ssld_L3_default_x{X}_s{s}", group=f"ssld_L3_default_x{X}", multiple=X,
                    deps=C, seed=s, store="L3_v1", defaults=True, **on_l3)
    # amendment 2 (README): the defaults after train-student's JS default lr changed from 0.1
    # to 0.4 (student_train/config.py: default_lr); the same command as ssld_L3_default_x3,
    # run by the changed package (the result records the lr it resolved)
    for s in sc.seeds:
        student(f"ssld_L3_jsdefault_x{X}_s{s}", group=f"ssld_L3_jsdefault_x{X}", multiple=X,
                deps=C + ("js_default_lr",), seed=s, store="L3_v1", defaults=True, **on_l3)
    for s in sc.seeds:  # seed 0 as declared in amendment 1b, seeds 1-2 by amendment 3
        student(f"ssld_L3_v1_x{X}_s{s}", group=f"ssld_L3_v1_x{X}", multiple=X, deps=tuned,
                seed=s, store="L3_v1", **on_l3)
    student("ssld_L3_default_x1_s0", group="ssld_L3_default_x1", multiple=1, deps=C, seed=0,
            store="L3_v1", defaults=True, **on_l3)
    infer("infer_U3", "U3", "U", VIEWS, ck, ("teacher_T3_s0",), embeddings=True)
    infer("infer_V3", "V3", "V", 1, ck, ("teacher_T3_s0",), embeddings=True)
    dups3 = dedup_steps("3", "U3", "V3")
    infer("infer_U3_v1", "U3_v1", "U", 1, ck, ("teacher_T3_s0",))
    main3 = select_merge(f"top{K}", "U3", "L3", lambda c: K, dedup=("dedup3", dups3))
    main3_v1 = select_merge(f"top{K}", "U3_v1", "L3_v1", lambda c: K, dedup=("dedup3", dups3))
    for s in sc.seeds:
        student(f"ssld_L3+U_x{X}_s{s}", group=f"ssld_L3+U_x{X}", multiple=X, deps=tuned, seed=s,
                store=main3, **on_l3)
        student(f"ssld_L3+U_default_x{X}_s{s}", group=f"ssld_L3+U_default_x{X}", multiple=X,
                deps=C, seed=s, store=main3_v1, defaults=True, **on_l3)
    student("ssld_L3+U_default_x1_s0", group="ssld_L3+U_default_x1", multiple=1, deps=C,
            seed=0, store=main3_v1, defaults=True, **on_l3)


def sizes(sc: Scale2) -> dict[str, int]:
    L = 10 * sc.labeled_per_class if sc.labeled_per_class else 6000
    T = L + 10 * sc.extra_per_class
    dev = 10 * sc.dev_per_class
    V = 10 * sc.val_per_class if sc.val_per_class else 10000
    return {"L": L, "T": T, "dev": dev, "Ltrain": L - dev, "U": sc.pool_size, "V": V}


def row_spec(ctx: Context) -> list[dict]:
    """The table the report prints: one row per setup with its train/eval steps (one per
    seed); ``multiple`` is the budget in multiples of study 1's."""
    sc, T, S = ctx.scale, ctx.teacher, ctx.student
    K, X = sc.k_main, sc.side_multiple

    def row(group: str, label: str, data: str, teacher: str, seeds, multiple: Optional[int],
            note: str = "", model: str = S) -> dict:
        prefix = group.rsplit("_x", 1)[0] if multiple else group
        suffix = f"_x{multiple}" if multiple else ""
        return {"group": group, "label": label, "model": model, "data": data,
                "teacher": teacher, "multiple": multiple, "note": note,
                "train_steps": [f"{prefix}{suffix}_s{s}" for s in seeds],
                "eval_steps": [f"eval_{prefix}{suffix}_s{s}" for s in seeds]}

    seeds = list(sc.seeds)
    rows = [row("teacher_T", f"teacher {T} on T", "T", "-", [0], None, model=T),
            row("teacher_Tshort", f"teacher {T} on T, {sc.short_teacher_epochs} epochs", "T",
                "-", [0], None, model=T),
            row("teacher_L", f"teacher {T} on L (study 1's recipe: the bridge)", "L", "-", [0],
                None, model=T)]
    for m in sc.multiples:
        rows += [row(f"label_only_x{m}", "student, label-only", "L", "-", seeds, m),
                 row(f"ssld_L_x{m}", "student, SSLD JS on L", "L", "T", seeds, m),
                 row(f"ssld_L+U_x{m}", f"student, SSLD JS on L + top-{K}/class of U",
                     f"L + U_top{K}", "T", seeds, m, "equal steps")]
    rows += [
        row(f"ssld_L+U_all_x{X}", "student, SSLD JS on L + all of U (no selection)",
            "L + U_all", "T", [0], X, "equal steps"),
        row(f"ssld_L_tshort_x{X}", "student, SSLD JS on L, the short teacher", "L", "Tshort",
            [0], X, "teacher table"),
        row("ssld_L_bridge_x1", "student, SSLD JS on L, study 1's teacher", "L", "L", [0], 1,
            "bridge: study 1's row 3"),
        row(f"ssld_L_bridge_x{X}", "student, SSLD JS on L, study 1's teacher", "L", "L", [0],
            X, "bridge"),
        row(f"ssld_L+U_bridge_x{X}", f"student, SSLD JS on L + top-{K}/class, study 1's "
            "teacher", f"L + U_top{K}", "L", [0], X, "bridge, equal steps"),
        row(f"ssld_L_v1_x{X}", "student, SSLD JS on L, 1 stored view, tuned lr", "L", "T", [0],
            X, "views alone"),
    ]
    for m in sorted({1, X}):
        n = seeds if m == X else [0]
        rows += [
            row(f"ssld_L_default_x{m}", "student, SSLD on L, train-student defaults", "L", "T",
                n, m, "the package's default lr and wd (in the results), 1 view"),
            row(f"ssld_L+U_default_x{m}", f"student, SSLD on L + top-{K}/class, defaults",
                f"L + U_top{K}", "T", n, m,
                "the package's default lr and wd (in the results), 1 view, equal steps"),
            row(f"label_only_default_x{m}", "student, label-only, train-student defaults", "L",
                "-", [0], m, "lr 0.1, wd 1e-5")]
    note3 = "amendment 1b: teacher T3"
    rows += [
        row("teacher_T3", f"teacher {T} on T, recomputed in sitting 3 (T3)", "T", "-", [0],
            None, model=T),
        row(f"ssld_L3_x{X}", "student, SSLD JS on L, tuned", "L", "T3", seeds, X, note3),
        row(f"ssld_L3_default_x{X}", "student, SSLD on L, train-student's old defaults", "L",
            "T3", [s for s in seeds if s in OLD_DEFAULT_SEEDS], X,
            note3 + "; lr 0.1, wd 1e-5, 1 view"),
        row(f"ssld_L3_v1_x{X}", "student, SSLD JS on L, 1 stored view, tuned lr", "L", "T3",
            seeds, X, note3 + "; views alone (amendment 3: 3 seeds)"),
        row(f"ssld_L3_jsdefault_x{X}", "student, SSLD on L, train-student's new defaults",
            "L", "T3", seeds, X, note3 + "; amendment 2: lr 0.4 (JS), wd 1e-5, 1 view"),
        row("ssld_L3_default_x1", "student, SSLD on L, train-student defaults", "L", "T3", [0],
            1, note3 + "; the package's default lr and wd (in the results), 1 view"),
        row(f"ssld_L3+U_x{X}", f"student, SSLD JS on L + top-{K}/class of U, tuned",
            f"L + U_top{K}", "T3", seeds, X, note3 + "; equal steps"),
        row(f"ssld_L3+U_default_x{X}", f"student, SSLD on L + top-{K}/class, defaults",
            f"L + U_top{K}", "T3", seeds, X,
            note3 + "; the package's default lr and wd (in the results), 1 view, equal steps"),
        row("ssld_L3+U_default_x1", f"student, SSLD on L + top-{K}/class, defaults",
            f"L + U_top{K}", "T3", [0], 1,
            note3 + "; the package's default lr and wd (in the results), 1 view, equal steps")]
    return rows


def estimate(ctx: Context, steps: list[Step]) -> driver.Estimate:
    """Seconds per part at the MEASURED rates (study 1's table, or --rates), one at a time,
    of the work ``build_steps`` put in ``ctx.work_est``."""
    # e.g. per-job rates measured while two jobs run: two_jobs_speedup 2
    rates = read_json(Path(ctx.args.rates)) if ctx.args.rates else {}
    m = dict(MEASURED) | rates
    parts: dict[str, float] = {}

    def part(name: str) -> str:
        if name.startswith(("tune_", "infer_dev")):
            return "tuning (teacher grid, student grids)"
        if name.startswith(("teacher_", "eval_teacher")):
            return "teachers (T, T short, L) + evals"
        if name.startswith(("infer_", "dedup")):
            return "infer-teacher stores, dedup"
        if "default" in name or "_v1_" in name:
            return "students: defaults vs tuned"
        if name.startswith(("ssld_L_x", "label_only_x", "eval_ssld_L_x", "eval_label_only_x")):
            return "students: the steps curve (before the gate)"
        if name.startswith(("ssld_L+U_x", "eval_ssld_L+U_x")):
            return "students: L + U at every budget"
        return "students: side rows (all of U, teacher table, bridge)"

    for name, (rate, images) in ctx.work_est.items():
        key = part(name.split(":")[0])
        parts[key] = parts.get(key, 0.0) + images / m[rate]
    n_processes = sum(step.command is not None for step in steps)
    parts["process start-ups"] = n_processes * m["startup_s"]
    return driver.Estimate(parts, rates.get("two_jobs_speedup", MEASURED["two_jobs_speedup"]))


def options(parser: argparse.ArgumentParser) -> None:
    """Study 2's own options."""
    parser.add_argument("--src", default=None,
                        help="IDX folder for `ssld prepare fashion-mnist --src` (default: its "
                             "own, /usr/share/datasets/fashion-mnist).")
    parser.add_argument("--rates", default=None,
                        help="JSON file of MEASURED rates that replace study 1's in --estimate.")


STUDY = driver.Study(
    name="Fashion-MNIST study 2: when do selected unlabeled images help? (issue 16)",
    description=__doc__.split("\n\n")[0], scales=SCALES, build=build_steps, rows=row_spec,
    estimate=estimate, results_dir=HERE / "results", teacher=TEACHER, student=STUDENT,
    constants={"input_size": INPUT_SIZE, "views": VIEWS}, options=options,
    extra=lambda c: {"protocol": 2, "multiples": list(c.scale.multiples)})


def main(argv: Optional[list[str]] = None) -> int:
    return driver.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(main())
