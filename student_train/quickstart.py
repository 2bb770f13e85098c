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

Sizes are chosen so the run takes under two minutes of one CPU core (one thread: the same
result run after run, and no thrashing when the cores are shared; ``threads`` is the one
setting every step gets); the printed table is a demonstration of the pipeline, not a tuned
result (see docs/results.md for the study).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import labelstore

if TYPE_CHECKING:  # pragma: no cover
    from teacher_infer.prepare import PreparedDataset

TEACHER = "resnet18"
STUDENT = "mobilenetv3_small_050"
INPUT_SIZE = 32                 # digits are 8×8: everything is upsampled to 32×32
CROP_SCALE = (0.35, 1.0)        # milder than ImageNet's 0.08: an 8×8 digit has little to lose
PREPROCESSING = dict(input_size=INPUT_SIZE, crop_pct=1.0, interpolation="bilinear")


@dataclass
class QuickstartConfig:
    workdir: str = "ssld-quickstart"     # everything is written below this folder
    teacher_epochs: int = 40             # on 200 labeled images (60: 93.1 % not 91.4 %, 1.5× time)
    student_epochs: int = 60             # label-only on L; SSLD sees as many images on L + U
    select_k: int = 100                  # pool images kept per class (top-k per class)
    views: int = 4                       # stored teacher views per image (view 0 = eval crop)
    topk: int = 10                       # all 10 digit classes: the full distribution is kept
    batch_size: int = 32                 # small batches: more steps on 200 images
    seed: int = 0
    device: str = "auto"
    num_workers: int = 1                 # one decoding process beside the 1-thread compute
    # CPU threads of every step (not the CPUs per rank, every other command's default): 1 is
    # fastest on a shared machine and keeps the table the same run after run
    threads: int = 1
    val_every: int = 10                  # validation every N epochs; the table is last.pt's
    progress: bool = True                # progress bars (on a terminal)


@dataclass
class StepTime:
    name: str
    seconds: float
    note: str = ""
    reused: bool = False         # finished by an earlier run: nothing was computed
    cpu_seconds: float = 0.0     # CPU time of this process (all its threads) in the step


# Expected seconds of steps 1-8 on a quiet 2-core machine with --threads 1 (the CPU seconds
# of each step in a run on the development machine), for the remaining-time estimate, scaled
# by how fast the finished steps ran.
EXPECTED_SECONDS = (2, 31, 6, 14, 0.2, 0.1, 54, 1)
STEPS = len(EXPECTED_SECONDS)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


# Options that change where and how fast a step runs, not its result: a rerun that changes
# only these reuses the step (train-student's --resume rule, plus the progress bar).
RUNTIME_OPTIONS = frozenset({"num_workers", "threads", "progress", "resume"})
# What train-student writes in a run directory: a run redone from scratch removes these, and
# refuses to touch a run directory that holds anything else.
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "config.json", "train.log", "failed.txt",
             "quickstart.done")


def _inputs(options: dict, **upstream: dict) -> dict:
    """What a step's output is computed from: its options (runtime ones left out) and the
    inputs of the steps whose outputs it reads, so a change anywhere upstream shows here."""
    chosen = {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}
    return json.loads(json.dumps({"options": chosen, **upstream}, sort_keys=True, default=str))


class _Ledger:
    """``quickstart_steps.json``: per step, the inputs it was computed from and whether it
    finished. A step is reused only when it finished from the inputs it has now."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict = (json.loads(labelstore.read_text(str(path), "quickstart record"))
                              if path.exists() else {})

    def state(self, name: str, inputs: dict) -> str:
        """``done``, ``started`` (interrupted: continue it) or ``new`` (compute afresh)."""
        entry = self.entries.get(name)
        if entry is None or entry.get("inputs") != inputs:
            return "new"
        return "done" if entry.get("done") else "started"

    def mark(self, name: str, inputs: dict, done: bool) -> None:
        self.entries[name] = {"inputs": inputs, "done": done}
        _write_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True))


class _Steps:
    """Step headings with the expected remaining time, and the per-call wall times."""

    def __init__(self, echo: Callable[[str], None], ledger: "_Ledger | None" = None):
        self.echo = echo
        self.ledger = ledger
        self.inputs: dict[str, dict] = {}     # this run's inputs of each step, by name
        self.times: list[StepTime] = []
        self.spent = self.expected = 0.0      # over finished steps that computed something
        self._current: tuple[int, float, int] | None = None  # number, start, first time row

    def begin(self, number: int, text: str) -> None:
        self._finish()
        scale = self.spent / self.expected if self.expected >= 5 else 1.0
        left = scale * sum(EXPECTED_SECONDS[number - 1:])
        self.echo(f"[{number}/{STEPS}] {text} (about {_duration(left)} left)")
        self._current = (number, time.perf_counter(), len(self.times))

    def _finish(self) -> None:
        if self._current is None:
            return
        number, start, first = self._current
        if not all(t.reused for t in self.times[first:]):
            self.spent += time.perf_counter() - start
            self.expected += EXPECTED_SECONDS[number - 1]
        self._current = None

    def timed(self, name: str, fn: Callable, note: Callable = lambda r: "", *,
              reused: bool = False):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.times.append(StepTime(name, time.perf_counter() - start, note(result), reused,
                                   time.process_time() - cpu))
        return result

    def cached(self, name: str, inputs: dict, exists: bool, compute: Callable[[str], object],
               note: Callable = lambda r: ""):
        """Step ``name`` through the ledger: ``compute(mode)`` is called with ``reuse`` when
        the step finished from these ``inputs`` and its output ``exists``, ``resume`` when a
        run from these inputs was interrupted, else ``fresh`` (the output is replaced)."""
        self.inputs[name] = inputs
        state = self.ledger.state(name, inputs)
        reused = state == "done" and exists

        def run():
            if reused:
                return compute("reuse")
            self.ledger.mark(name, inputs, done=False)
            result = compute("resume" if state == "started" else "fresh")
            self.ledger.mark(name, inputs, done=True)
            return result

        return self.timed(name, run, note, reused=reused)


@dataclass
class QuickstartResult:
    teacher_top1: float
    baseline_top1: float
    ssld_top1: float
    selected: int
    duplicates: int
    steps: list[StepTime] = field(default_factory=list)
    workdir: str = ""
    threads: int = 1

    def table(self) -> str:
        """The accuracy table, then the wall time of every step."""
        return self._accuracy_table() + "\n\n" + self._time_table()

    def _accuracy_table(self) -> str:
        rows = [("teacher " + TEACHER + ", supervised on L (200 images)", self.teacher_top1),
                ("student " + STUDENT + ", label-only on L", self.baseline_top1),
                ("student " + STUDENT + f", SSLD (JS) on L + {self.selected} selected pool",
                 self.ssld_top1)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'model (last.pt)':<{width}}  val top-1", f"{'-' * width}  ---------"]
        lines += [f"{name:<{width}}  {100 * top1:8.2f}%" for name, top1 in rows]
        return "\n".join(lines)

    def _time_table(self) -> str:
        lines = ["step                          wall time"]
        lines += [f"{s.name:<28}  " + (f"{'reused':>9}" if s.reused else f"{s.seconds:7.1f} s")
                  + f"  {s.note}" for s in self.steps]
        lines.append(f"{'total':<28}  {sum(s.seconds for s in self.steps):7.1f} s"
                     f"  ({self.threads} thread{'s' if self.threads > 1 else ''})")
        return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _store_complete(path: str) -> bool:
    try:
        return labelstore.open(path).is_complete
    except (FileNotFoundError, ValueError):
        return False


def run(cfg: QuickstartConfig, echo: Callable[[str], None] = print) -> QuickstartResult:
    """Run the pipeline under ``cfg.workdir`` and return the accuracies and step times.

    Finished steps are reused when the command is run again with the same options (marked
    ``reused`` in the table), so an interrupted quickstart continues where it stopped; a step
    whose options, or whose inputs' options, changed is computed again (``_Ledger``).
    ``quickstart.json`` keeps the first complete run's step times and adds each later run
    under ``reruns``.
    """
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = _Steps(echo, _Ledger(work / "quickstart_steps.json"))

    data = _prepare(cfg, work, steps)
    teacher = _train_teacher(cfg, work, data, steps)
    labeled, pool, val = _infer_teacher(cfg, work, data, teacher, steps)
    exclude, duplicates = _dedup(cfg, work, pool, val, steps)
    selected, rows_selected = _select(cfg, work, pool, exclude, steps)
    train_store = _merge(work, labeled, selected, steps, cfg.progress)
    _train_students(cfg, work, data, train_store, steps)
    scores = _evaluate(cfg, work, data, steps)

    result = QuickstartResult(teacher_top1=scores[0], baseline_top1=scores[1],
                              ssld_top1=scores[2], selected=rows_selected,
                              duplicates=duplicates, steps=steps.times, workdir=str(work),
                              threads=cfg.threads)
    _save_summary(work / "quickstart.json", result)
    return result


def _runtime(cfg: QuickstartConfig) -> dict:
    """Where and on how many threads every step runs, and whether it draws a bar: the
    options teacher inference, training and eval share (dedup gets the same device, threads
    and bar setting)."""
    return dict(device=cfg.device, num_workers=cfg.num_workers, threads=cfg.threads,
                progress=cfg.progress)


def _prepare(cfg: QuickstartConfig, work: Path, steps: _Steps) -> PreparedDataset:
    """Step 1: the digits images and list files."""
    from teacher_infer.prepare import prepare_digits

    steps.begin(1, f"writing the digits data set under {work / 'data'}")
    return steps.cached(
        "prepare digits", _inputs({"seed": cfg.seed}), (work / "data" / "meta.json").exists(),
        lambda mode: prepare_digits(work / "data", seed=cfg.seed, overwrite=mode != "reuse",
                                    progress=cfg.progress),
        lambda d: f"{d.num_labeled} L / {d.num_pool} U / {d.num_val} V")


def _train_options(cfg: QuickstartConfig, dataset: PreparedDataset, run_dir: Path,
                   **options) -> dict:
    """The TrainConfig fields of a run in ``run_dir``: the quickstart's settings (validation
    on ``dataset``'s val set), then ``options``."""
    return {**dict(student=STUDENT, out=str(run_dir), val=dataset.val, val_root=dataset.root,
                   input_size=INPUT_SIZE, batch_size=cfg.batch_size, lr=0.4, warmup_epochs=2,
                   weight_decay=5e-5, crop_scale=CROP_SCALE, seed=cfg.seed, precision="fp32",
                   val_every=cfg.val_every, **_runtime(cfg)), **options}


def _train(steps: _Steps, title: str, options: dict, note: Callable = lambda r: "",
           **upstream: dict) -> str:
    """Train the run ``options`` describe unless an earlier quickstart finished it from the
    same options and ``upstream`` inputs; returns its last.pt."""
    from .config import TrainConfig
    from .trainer import train

    run_dir = Path(options["out"])

    def train_run(mode: str) -> None:
        if mode == "fresh":
            _clear_run_dir(run_dir)
        if mode != "reuse":  # an interrupted run continues from its last checkpoint
            train(TrainConfig(**options, resume=(run_dir / "last.pt").exists()))

    steps.cached(title, _inputs(options, **upstream), (run_dir / "last.pt").exists(), train_run,
                 note)
    return str(run_dir / "last.pt")


def _clear_run_dir(run_dir: Path) -> None:
    """Remove what train-student wrote in ``run_dir`` (a run redone with other options); a
    folder holding anything else is refused, not emptied."""
    if not run_dir.exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in RUN_FILES and ".tmp." not in p.name)
    if foreign:
        raise ValueError(f"{run_dir} holds {foreign[0]!r}, which train-student did not write; "
                         "refusing to replace the run (choose another --workdir)")
    for entry in run_dir.iterdir():
        entry.unlink()


def _train_teacher(cfg: QuickstartConfig, work: Path, data: PreparedDataset,
                   steps: _Steps) -> str:
    """Step 2: the teacher, supervised on the labeled set; returns its checkpoint."""
    steps.begin(2, f"training the teacher ({TEACHER}) on the {data.num_labeled} labeled images")
    return _train(steps, "train teacher", _train_options(
        cfg, data, work / "runs" / "teacher", student=TEACHER, data=data.labeled,
        root=data.root, supervised=True, epochs=cfg.teacher_epochs),
        data=steps.inputs["prepare digits"])


def _infer(cfg: QuickstartConfig, data: PreparedDataset, steps: _Steps, checkpoint: str,
           out: Path, title: str, source: str, note: str, **options) -> str:
    """One teacher pass over ``source`` into the store ``out``, unless an earlier quickstart
    completed it with the same options and teacher."""
    from teacher_infer import InferConfig
    from teacher_infer import run as infer

    out = str(out)
    settings = dict(model=TEACHER, checkpoint=checkpoint, data=source, root=data.root, out=out,
                    topk=cfg.topk, seed=cfg.seed, crop_scale=CROP_SCALE, batch_size=256,
                    class_names=data.class_names, decoder=_teacher_decoder(), precision="fp32",
                    **PREPROCESSING, **{**_runtime(cfg), **options})

    def label(mode: str):
        # resume: infer-teacher continues the store an interrupted run left; fresh: replace it
        if mode != "reuse":
            infer(InferConfig(**settings, overwrite=mode == "fresh" and labelstore.exists(out)))

    steps.cached(title, _inputs(settings, teacher=steps.inputs["train teacher"]),
                 _store_complete(out), label, lambda r: note)
    return out


def _teacher_decoder() -> str:
    """The quickstart's teacher pass decodes with DALI wherever it is installed (its CPU mode
    on the CPU), as before ``--decoder auto`` became one rule (PIL on the CPU): the stores and
    the table stay those every earlier quickstart wrote."""
    from teacher_infer.imaging import decoder_class

    return "dali" if decoder_class("dali").unavailable() is None else "pil"


def _infer_teacher(cfg: QuickstartConfig, work: Path, data: PreparedDataset, teacher: str,
                   steps: _Steps) -> tuple[str, str, str]:
    """Step 3: the labeled, pool and val stores (views on L and U, embeddings on U and V)."""
    steps.begin(3, "teacher inference: labeled set and pool with views, val for dedup")
    stores = work / "stores"
    labeled = _infer(cfg, data, steps, teacher, stores / "labeled.zarr", "infer-teacher L",
                     data.labeled, f"{cfg.views} views", views=cfg.views)
    pool = _infer(cfg, data, steps, teacher, stores / "pool.zarr", "infer-teacher U",
                  data.pool, f"{cfg.views} views + embeddings", views=cfg.views,
                  embeddings=True)
    val = _infer(cfg, data, steps, teacher, stores / "val.zarr", "infer-teacher V (dedup)",
                 data.val, "embeddings only are used", views=1, embeddings=True)
    return labeled, pool, val


def _dedup(cfg: QuickstartConfig, work: Path, pool: str, val: str,
           steps: _Steps) -> tuple[Path, int]:
    """Step 4: the pool images that duplicate val images; returns the list and their count."""
    steps.begin(4, "dedup: pool images that duplicate validation images")
    exclude = work / "stores" / "pool_vs_val.dups"

    def find_duplicates(mode: str) -> int:
        if mode != "reuse":  # written whole (renamed into place): it exists = complete
            from teacher_infer.dedup import DedupConfig, dedup

            found = dedup(DedupConfig(query=val, pool=pool, device=cfg.device,
                                      threads=cfg.threads, progress=cfg.progress))
            _write_atomic(exclude, "\n".join(found.lines()) + "\n")
        return sum(1 for line in labelstore.read_lines(str(exclude), "exclude file")
                   if line and not line.startswith("#"))

    duplicates = steps.cached("dedup U vs V", _inputs(
        {}, pool=steps.inputs["infer-teacher U"], val=steps.inputs["infer-teacher V (dedup)"]),
        exclude.exists(), find_duplicates, lambda n: f"{n} confirmed")
    return exclude, duplicates


def _select(cfg: QuickstartConfig, work: Path, pool: str, exclude: Path,
            steps: _Steps) -> tuple[str, int]:
    """Step 5: per class the ``select_k`` pool images the teacher scores highest."""
    steps.begin(5, f"select-topk: {cfg.select_k} pool images per class")
    selected = str(work / "stores" / f"pool_top{cfg.select_k}.zarr")
    selection = steps.timed("select-topk", lambda: labelstore.select_topk(
        pool, cfg.select_k, selected, exclude=str(exclude), overwrite=True,
        progress=cfg.progress),
        lambda r: f"{r.rows_written} rows")
    return selected, selection.rows_written


def _merge(work: Path, labeled: str, selected: str, steps: _Steps, progress: bool) -> str:
    """Step 6: the training store, labeled rows then the selected pool rows."""
    steps.begin(6, "merge: labeled store + selected pool")
    train_store = str(work / "stores" / "train.zarr")
    steps.timed("merge", lambda: labelstore.merge([labeled, selected], train_store,
                                                  overwrite=True, progress=progress))
    return train_store


def _train_students(cfg: QuickstartConfig, work: Path, data: PreparedDataset,
                    train_store: str, steps: _Steps) -> None:
    """Step 7: the label-only baseline on L and the SSLD student on L + selected U."""
    steps.begin(7, f"students ({STUDENT}): label-only baseline and SSLD")
    _train(steps, "train label-only student", _train_options(
        cfg, data, work / "runs" / "student_labels", data=data.labeled, root=data.root,
        supervised=True, epochs=cfg.student_epochs), data=steps.inputs["prepare digits"])
    # Same number of images seen as the label-only run: the gain must come from the teacher's
    # labels and the pool's variety, not from a longer schedule.
    ssld_epochs = max(1, round(cfg.student_epochs * data.num_labeled / len(labelstore.open(
        train_store))))
    # its store is select-topk's and merge's, redone every time from these inputs
    selection = {"labeled": steps.inputs["infer-teacher L"], "dedup": steps.inputs["dedup U vs V"],
                 "select_k": {"options": cfg.select_k}}
    _train(steps, "train SSLD student", _train_options(
        cfg, data, work / "runs" / "student_ssld", stores=(train_store,), loss="js",
        epochs=ssld_epochs), lambda r: f"replay views, {ssld_epochs} epochs = same images seen",
        **selection)


def _evaluate(cfg: QuickstartConfig, work: Path, data: PreparedDataset,
              steps: _Steps) -> tuple[float, float, float]:
    """Step 8: val top-1 of the teacher, the label-only and the SSLD student (last.pt)."""
    from .evaluation import evaluate

    steps.begin(8, "eval on the validation set")

    def top1(run_name: str, model: str) -> float:
        checkpoint = str(work / "runs" / run_name / "last.pt")
        return evaluate(model, checkpoint, data.val, root=data.root, input_size=INPUT_SIZE,
                        **_runtime(cfg)).top1

    return steps.timed("eval (3 models)", lambda: (
        top1("teacher", TEACHER), top1("student_labels", STUDENT), top1("student_ssld", STUDENT)))


def _save_summary(path: Path, result: QuickstartResult) -> None:
    """The first complete run's record; later runs are appended under ``reruns``."""
    record = asdict(result)
    if path.exists():
        first = json.loads(labelstore.read_text(str(path), "quickstart record"))
        rerun = {k: record[k] for k in ("steps", "threads")}
        rerun["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record = {**first, "reruns": first.get("reruns", []) + [rerun]}
    _write_atomic(path, json.dumps(record, indent=2))
