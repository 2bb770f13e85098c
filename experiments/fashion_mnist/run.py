#!/usr/bin/env python3
"""Study 1: the SSLD ablation table, reproduced in miniature on Fashion-MNIST (issue 6).

The protocol of ``experiments/fashion_mnist/README.md`` as steps for the study driver
(``experiments/driver.py``: scheduling, resuming, the results file). Every step is a
subprocess call of the public ``ssld`` console script (prepare, train-student, infer-teacher,
dedup, select-topk, merge, eval, inspect), so anyone can rerun any single step by hand: the exact
command of every step is in its log (``WORKDIR/logs/STEP.log``) and in the results JSON.

    python experiments/fashion_mnist/run.py --workdir /data/fm --scale full
    python experiments/fashion_mnist/report.py --results experiments/fashion_mnist/results/full.json

Resumable: run the same command again to continue after a crash or a time limit, in the same
workdir or, when it is gone, from the committed results JSON (``experiments/record.py``).
Results are read from files and JSON only (``experiments/steps.py``). The hidden pool labels
are read once, at the end, to report how often the teacher's pseudo-label of a *selected* pool
image is right (never used to choose anything).
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: the checkout's `experiments` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments import driver  # noqa: E402
from experiments.driver import Context, Step  # noqa: E402
from experiments.steps import (  # noqa: E402
    DEV_SEED, INPUT_SIZE, MEASURED, STUDENT, TEACHER, VIEWS, collect_prepared, count_dups,
    dedup_threshold, eval_step, infer_step, inspect_step, list_hashes, per_class,
    pseudo_label_check, read_list, ssld, train_command, train_step, tune_steps, write_list)

HERE = Path(__file__).resolve().parent


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


def estimate(sc: Scale, steps: list[Step], L: int = 6000, U: int = 54000,
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
# the protocol

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


STUDY = driver.Study(
    name="SSLD ablations on Fashion-MNIST (issue 6)", description=__doc__.split("\n\n")[0],
    scales=SCALES, build=build_steps, rows=row_spec,
    estimate=lambda ctx, steps: driver.Estimate(estimate(ctx.scale, steps),
                                                MEASURED["two_jobs_speedup"]),
    results_dir=HERE / "results", teacher=TEACHER, student=STUDENT,
    constants={"input_size": INPUT_SIZE, "views": VIEWS})


def main(argv: Optional[list[str]] = None) -> int:
    return driver.main(STUDY, argv)


if __name__ == "__main__":
    sys.exit(main())
