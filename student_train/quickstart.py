"""``ssld quickstart``: the whole SSLD pipeline on scikit-learn's bundled digits.

Real data that ships inside an installed package (1,797 scanned 8×8 digits), split into a
labeled set L (20 per class), an unlabeled pool U (1,237 images, labels hidden) and a
validation set V (36 per class). Every step calls the library function behind the
matching ``ssld`` command:

1. ``prepare digits``            images + list files
2. ``train-student --supervised`` the teacher (resnet18) on L
3. ``infer-teacher``              teacher top-k + views on L and U, embeddings on U and V
4. ``dedup``                      U against V (SIFT verification)
5. ``select-topk``                per class the K pool images the teacher scores highest
6. ``merge``                      L + selected U
7. ``train-student``              the student (mobilenetv3_small_050): label-only on L, and
                                  SSLD (JS divergence to the stored labels) on L + selected U
8. ``eval``                       top-1 of teacher and students on V

Sizes are chosen so the run takes a few minutes on two CPU cores; the printed table is a
demonstration of the pipeline, not a tuned result (see docs/results.md for the study).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

TEACHER = "resnet18"
STUDENT = "mobilenetv3_small_050"
INPUT_SIZE = 32                 # digits are 8×8: everything is upsampled to 32×32
CROP_SCALE = (0.35, 1.0)        # milder than ImageNet's 0.08: an 8×8 digit has little to lose
PREPROCESSING = dict(input_size=INPUT_SIZE, crop_pct=1.0, interpolation="bilinear")


@dataclass
class QuickstartConfig:
    workdir: str = "ssld-quickstart"     # everything is written below this folder
    teacher_epochs: int = 60             # on 200 labeled images
    student_epochs: int = 60             # label-only on L; SSLD sees as many images on L + U
    select_k: int = 100                  # pool images kept per class (top-k per class)
    views: int = 4                       # stored teacher views per image (view 0 = eval crop)
    topk: int = 10                       # all 10 digit classes: the full distribution is kept
    batch_size: int = 32                 # small batches: more steps on 200 images
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0                 # tiny images decode faster in-process than in workers
    progress: bool = True


@dataclass
class StepTime:
    name: str
    seconds: float
    note: str = ""


@dataclass
class QuickstartResult:
    teacher_top1: float
    baseline_top1: float
    ssld_top1: float
    selected: int
    duplicates: int
    steps: list[StepTime] = field(default_factory=list)
    workdir: str = ""

    def table(self) -> str:
        rows = [("teacher " + TEACHER + ", supervised on L (200 images)", self.teacher_top1),
                ("student " + STUDENT + ", label-only on L", self.baseline_top1),
                ("student " + STUDENT + f", SSLD (JS) on L + {self.selected} selected pool",
                 self.ssld_top1)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'model':<{width}}  val top-1", f"{'-' * width}  ---------"]
        lines += [f"{name:<{width}}  {100 * top1:8.2f}%" for name, top1 in rows]
        lines += ["", "step                          wall time"]
        lines += [f"{s.name:<28}  {s.seconds:7.1f} s  {s.note}" for s in self.steps]
        lines.append(f"{'total':<28}  {sum(s.seconds for s in self.steps):7.1f} s")
        return "\n".join(lines)


def _timed(steps: list[StepTime], name: str, fn: Callable, note: Callable = lambda r: ""):
    start = time.perf_counter()
    result = fn()
    steps.append(StepTime(name, time.perf_counter() - start, note(result)))
    return result


def run(cfg: QuickstartConfig, echo: Callable[[str], None] = print) -> QuickstartResult:
    """Run the pipeline under ``cfg.workdir`` and return the accuracies and step times.

    Finished steps are reused when the command is run again (each library call resumes
    or skips completed work), so an interrupted quickstart continues where it stopped.
    """
    import labelstore
    from teacher_infer import InferConfig
    from teacher_infer import run as infer
    from teacher_infer.prepare import prepare_digits

    from .config import TrainConfig
    from .evaluation import evaluate
    from .trainer import train

    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps: list[StepTime] = []
    common = dict(device=cfg.device, num_workers=cfg.num_workers)

    echo(f"[1/8] writing the digits data set under {work / 'data'}")
    data = _timed(steps, "prepare digits", lambda: prepare_digits(work / "data", seed=cfg.seed),
                  lambda d: f"{d.num_labeled} L / {d.num_pool} U / {d.num_val} V")

    def train_run(name: str, **options) -> str:
        run_dir = work / "runs" / name
        options = {**dict(student=STUDENT, out=str(run_dir), val=data.val, val_root=data.root,
                          input_size=INPUT_SIZE, batch_size=cfg.batch_size, lr=0.4,
                          warmup_epochs=2, weight_decay=5e-5, crop_scale=CROP_SCALE,
                          seed=cfg.seed, precision="fp32", **common), **options}
        finished = run_dir / "quickstart.done"
        if not finished.exists():
            # an interrupted run continues from its last checkpoint
            options["resume"] = (run_dir / "last.pt").exists()
            train(TrainConfig(**options))
            finished.write_text("finished\n")
        return str(run_dir / "last.pt")

    echo(f"[2/8] training the teacher ({TEACHER}) on the {data.num_labeled} labeled images")
    teacher_ckpt = _timed(steps, "train teacher", lambda: train_run(
        "teacher", student=TEACHER, data=data.labeled, root=data.root, supervised=True,
        epochs=cfg.teacher_epochs))

    def infer_store(name: str, source: str, **options):
        out = str(work / "stores" / f"{name}.zarr")
        summary = infer(InferConfig(
            model=TEACHER, checkpoint=teacher_ckpt, data=source, root=data.root, out=out,
            topk=cfg.topk, seed=cfg.seed, crop_scale=CROP_SCALE, batch_size=256,
            class_names=data.class_names, progress=cfg.progress,
            **PREPROCESSING,
            **{**common, **options}))
        return out, summary

    echo("[3/8] teacher inference: labeled set and pool with views, val for dedup")
    labeled_store, _ = _timed(steps, "infer-teacher L", lambda: infer_store(
        "labeled", data.labeled, views=cfg.views), lambda r: f"{cfg.views} views")
    pool_store, _ = _timed(steps, "infer-teacher U", lambda: infer_store(
        "pool", data.pool, views=cfg.views, embeddings=True),
        lambda r: f"{cfg.views} views + embeddings")
    val_store, _ = _timed(steps, "infer-teacher V (dedup)", lambda: infer_store(
        "val", data.val, views=1, embeddings=True), lambda r: "embeddings only are used")

    echo("[4/8] dedup: pool images that duplicate validation images")
    exclude = str(work / "stores" / "pool_vs_val.dups")
    dups = _timed(steps, "dedup U vs V", lambda: labelstore.dedup(val_store, pool_store, exclude),
                  lambda r: f"{len(r.pool_keys)} confirmed")

    echo(f"[5/8] select-topk: {cfg.select_k} pool images per class")
    selected_store = str(work / "stores" / f"pool_top{cfg.select_k}.zarr")
    selection = _timed(steps, "select-topk", lambda: labelstore.select_topk(
        pool_store, cfg.select_k, selected_store, exclude=exclude, overwrite=True),
        lambda r: f"{r.rows_written} rows")

    echo("[6/8] merge: labeled store + selected pool")
    train_store = str(work / "stores" / "train.zarr")
    _timed(steps, "merge", lambda: labelstore.merge([labeled_store, selected_store], train_store,
                                                    overwrite=True))

    echo(f"[7/8] students ({STUDENT}): label-only baseline and SSLD")
    _timed(steps, "train label-only student", lambda: train_run(
        "student_labels", data=data.labeled, root=data.root, supervised=True,
        epochs=cfg.student_epochs))
    # Same number of images seen as the label-only run: the gain must come from the teacher's
    # labels and the pool's variety, not from a longer schedule.
    ssld_epochs = max(1, round(cfg.student_epochs * data.num_labeled / len(labelstore.open(
        train_store))))
    _timed(steps, "train SSLD student", lambda: train_run(
        "student_ssld", stores=(train_store,), loss="js", epochs=ssld_epochs),
        lambda r: f"replay views, {ssld_epochs} epochs = same images seen")

    echo("[8/8] eval on the validation set")

    def top1(run_name: str, model: str) -> float:
        checkpoint = str(work / "runs" / run_name / "last.pt")
        return evaluate(model, checkpoint, data.val, root=data.root, input_size=INPUT_SIZE,
                        **common).top1

    scores = _timed(steps, "eval (3 models)", lambda: (
        top1("teacher", TEACHER), top1("student_labels", STUDENT), top1("student_ssld", STUDENT)))
    result = QuickstartResult(teacher_top1=scores[0], baseline_top1=scores[1],
                              ssld_top1=scores[2], selected=selection.rows_written,
                              duplicates=len(dups.pool_keys), steps=steps, workdir=str(work))
    (work / "quickstart.json").write_text(json.dumps(asdict(result), indent=2))
    return result
