"""Every GPU figure of issue 12 from one run: teacher, the teacher reading WebDataset tar
shards against the same images as files (issue 24), decoder agreement, the teacher's bf16 vs
fp32 agreement (issue 22: infer-teacher's default precision), the teacher with replayed
augmentation against crop-only views (issue 25), training, dedup, quickstart — DALI ``mixed``
and PIL side by side.

GPU (one H200, <= 7 minutes; after the DALI staging, see README.md here):
    PYTHONPATH=/tmp/site:$PWD python benchmarks/gpu/run.py --out "$OUT"
CPU smoke (tiny sizes, DALI on the CPU; what tests/test_gpu_script.py runs):
    python benchmarks/gpu/run.py --smoke --out DIR

Each part runs in its own process under a deadline (its cap, and what is left of the global
``--budget``), so a part that crashes or hangs costs only itself: its error or timeout is
recorded and the next part runs. A part writes ``OUT/parts/NAME.json`` after every
measurement, so a part killed at its deadline keeps what it had measured. The driver then
writes ``OUT/results.json`` (environment + every part) and prints one summary table; on a
GPU it also keeps ``nvidia-smi dmon`` samples in ``OUT/dmon.txt``.

The measuring loops are the benchmarks' own (``teacher_infer_bench``, ``train_bench``);
this file only chooses sizes, orders the work and records it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]  # the project's packages, the benchmark modules

PARTS = ("env", "images", "teacher", "shards", "agreement", "precision", "augment", "train",
         "quickstart", "dedup")
# infer-teacher's augmentation settings the augment part compares with crop-only views
AUGMENT_SETTINGS = {
    "crop only": {},
    "randaugment+erasing": dict(augment="rand-m9-n2-mstd0.5", erase=0.25),
    "+mixup/cutmix": dict(augment="rand-m9-n2-mstd0.5", erase=0.25, mixup=0.2, cutmix=1.0),
}
TRAIN_MODES = ("supervised", "stored (replay)", "stored (global)", "online")

# One H200: the sizes. Part caps add up to more than the budget on purpose: a part
# that finishes early leaves its time to the next ones.
GPU = dict(
    device="cuda", budget_s=420,
    caps=dict(env=30, images=45, teacher=125, shards=60, agreement=30, precision=45,
              augment=100, train=120, quickstart=80, dedup=30),
    teacher=dict(model="resnext101_32x16d", images=6144, batch_size=256, precision="bf16",
                 channels_last=True, views=(1, 4), workers=None),
    shards=dict(per_shard=1024),      # the teacher's JPEGs as 6 shards of IN-22k's layout
    # 2,048 images, 3 epochs, epochs 2-3 measured: 16 steps of 256 per mode and decoder
    train=dict(student="mobilenetv3_large_100", teachers=("resnet50d", "resnext101_32x16d"),
               images=2048, image_size=(500, 375), input_size=224, batch_size=256, workers=8,
               epochs=3, precision="bf16"),
    quickstart=dict(teacher_epochs=15, student_epochs=15, select_k=100),
    dedup=dict(queries=10_000, pool=100_000, dim=2048),
)
# The same work on two CPU cores in about a minute: timm test models, a few dozen JPEGs.
SMOKE = dict(
    # generous caps: the shared development machine runs 5-10x slower when others are busy
    device="cpu", budget_s=660,
    caps=dict(env=60, images=60, teacher=150, shards=120, agreement=60, precision=90,
              augment=120, train=120, quickstart=60, dedup=60),
    teacher=dict(model="test_convnext", images=32, batch_size=16, precision="fp32",
                 channels_last=False, views=(1, 4), workers=None),
    shards=dict(per_shard=12),
    train=dict(student="test_resnet", teachers=("test_resnet", "test_convnext"), images=32,
               image_size=(96, 72), input_size=32, batch_size=16, workers=0, epochs=2,
               precision="fp32"),
    quickstart=dict(teacher_epochs=1, student_epochs=1, select_k=10,
                    skip_run="smoke: the whole pipeline takes 3-6 minutes on the shared "
                    "two-core machine (tests/test_quickstart.py runs it); the command's options "
                    "are checked against ssld quickstart --help"),
    dedup=dict(queries=50, pool=500, dim=64),
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, default=str)
    os.replace(tmp, path)  # a reader never sees half a file, even after a kill


class Recorder:
    """One part's record: every measurement's result, error or skip reason, written to disk
    after each measurement."""

    def __init__(self, name: str, path: str, deadline: float):
        self.path, self.deadline = path, deadline
        self.record = {"part": name, "status": "running", "started": now_iso(), "results": {},
                       "errors": {}, "skipped": {}, "running": None}
        self._save()

    def _save(self) -> None:
        write_json(self.path, self.record)

    def left_s(self) -> float:
        return self.deadline - time.time()

    def measure(self, name: str, fn, *, needs_s: float = 0.0):
        """``fn()``'s result under ``results[name]``; an exception is recorded under
        ``errors[name]`` and returns None. Skipped (with the reason) when fewer than
        ``needs_s`` seconds are left before the part's deadline."""
        if self.left_s() < needs_s:
            self.skip(name, f"time box: {self.left_s():.0f} s left of the part's deadline, "
                      f"this needs ~{needs_s:.0f} s")
            return None
        self.record["running"] = name
        self._save()
        started = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the part goes on
            lines = traceback.format_exc().strip().splitlines()
            self.record["errors"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                           "traceback": lines[-25:]}
            result = None
        else:
            if isinstance(result, dict):
                result = {**result, "seconds": round(time.perf_counter() - started, 3)}
            self.record["results"][name] = result
        self.record["running"] = None
        self._save()
        return result

    def skip(self, name: str, reason: str) -> None:
        self.record["skipped"][name] = reason
        self._save()

    def note(self, **values) -> None:
        self.record.setdefault("notes", {}).update(values)
        self._save()

    def finish(self) -> None:
        record = self.record
        if record["errors"]:
            record["status"] = "partial" if record["results"] else "error"
        elif record["results"]:
            record["status"] = "ok"
        else:
            record["status"] = "skipped"
            if not record["skipped"]:  # a part never ends empty without saying why
                record["skipped"]["part"] = "the part measured nothing"
        record["finished"] = now_iso()
        self._save()


# -- parts ------------------------------------------------------------------------------
def _command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{command[0]}: {exc}"


def part_env(rec: Recorder, cfg: dict, ctx) -> None:
    def software():
        from importlib import metadata

        versions = {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count()}
        installed = {(d.metadata["Name"] or "").lower(): d.version
                     for d in metadata.distributions()}
        for name in ("torch", "timm", "numpy", "pillow", "zarr", "numcodecs", "scikit-learn",
                     "opencv-python-headless", "opencv-python"):
            versions[name] = installed.get(name)
        versions["dali_wheels"] = {n: v for n, v in installed.items() if "dali" in n
                                   or "nvimgcodec" in n or "nvjpeg" in n}
        try:  # installed is not enough: the staged wheels must import
            import nvidia.dali
            versions["nvidia.dali"] = nvidia.dali.__version__
        except Exception as exc:  # noqa: BLE001 - an absent library is a fact to record
            versions["nvidia.dali"] = f"not importable: {type(exc).__name__}: {exc}"[:200]
        return versions

    def accelerator():
        import torch

        info = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        gpu_count=torch.cuda.device_count())
        if shutil.which("nvidia-smi"):
            info["nvidia_smi"] = _command_output(["nvidia-smi"])
            info["nvidia_smi_query"] = _command_output([
                "nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                "power.limit", "--format=csv"])
        else:
            info["nvidia_smi"] = "nvidia-smi not found"
        return info

    rec.measure("software", software)
    rec.measure("accelerator", accelerator)
    rec.measure("git", lambda: {"commit": (_command_output(
        ["git", "-C", ROOT, "rev-parse", "HEAD"]) or "").strip() or None})


def part_images(rec: Recorder, cfg: dict, ctx) -> None:
    import teacher_infer_bench as tb

    count = cfg["teacher"]["images"]

    def generate():
        started = time.perf_counter()
        before = len(os.listdir(ctx.images)) if os.path.isdir(ctx.images) else 0
        tb.make_images(ctx.images, count, os.cpu_count() or 1)
        return {"images": count, "generated": max(0, count - before),
                "wall_s": round(time.perf_counter() - started, 2), "folder": ctx.images,
                "sizes": [list(s) for s in tb.SIZES]}

    rec.measure("teacher_jpegs", generate)


def _threads(cfg: dict) -> int | None:
    """CPU threads of every run: 1 on the CPU (a shared two-core machine: one thread is faster
    and steadier), the CPUs per rank (ssld's default) on the GPU machine."""
    return 1 if cfg["device"] == "cpu" else None


def _torch_threads(cfg: dict) -> None:
    if cfg["device"] == "cpu":
        import torch
        torch.set_num_threads(_threads(cfg))


def _complete(path: str) -> bool:
    """A complete label store at ``path`` (absent, unfinished or damaged: False)."""
    import labelstore

    try:
        return labelstore.open(path).is_complete
    except Exception:  # noqa: BLE001 - anything but a good store is rebuilt
        return False


def _store_path(ctx, decoder: str, views: int) -> str:
    return os.path.join(ctx.work, "stores", f"teacher-{decoder}-v{views}.zarr")


def _teacher_args(cfg: dict, views: int) -> SimpleNamespace:
    t = cfg["teacher"]
    return SimpleNamespace(model=t["model"], images=t["images"], batch_size=t["batch_size"],
                           precision=t["precision"], channels_last=t["channels_last"],
                           device=cfg["device"], workers=t["workers"], views=views,
                           threads=_threads(cfg))


def _teacher_images(cfg: dict, ctx) -> None:
    """The images part's JPEGs (a no-op once they exist), for a run of this part alone."""
    import teacher_infer_bench as tb

    tb.make_images(ctx.images, cfg["teacher"]["images"], os.cpu_count() or 1)


def part_teacher(rec: Recorder, cfg: dict, ctx) -> None:
    import teacher_infer_bench as tb

    _torch_threads(cfg)
    _teacher_images(cfg, ctx)
    scratch = os.path.join(ctx.work, "stores", "scratch.zarr")  # only a config field here
    rec.note(dali_device="mixed" if cfg["device"] == "cuda" else "cpu",
             model=cfg["teacher"]["model"], images=cfg["teacher"]["images"])
    for views in cfg["teacher"]["views"]:
        args = _teacher_args(cfg, views)
        rec.measure(f"v{views}/model_only", lambda: {"img_s": tb.model_only(
            args, ctx.images, scratch)})
        for decoder in ctx.decoders:
            rec.measure(f"v{views}/decode_only/{decoder}", lambda: {"img_s": tb.decode_only(
                args, ctx.images, scratch, decoder)})
            rec.measure(f"v{views}/end_to_end/{decoder}", lambda: tb.end_to_end(
                args, ctx.images, _store_path(ctx, decoder, views), decoder))


def _same_labels(files_path: str, shards_path: str) -> dict:
    """Row by row (both in file order), whether the teacher's stored top-k from the shards
    equals that from the files: the same bytes, decoder and (view-0) boxes."""
    import numpy as np

    import labelstore

    files, shards = (labelstore.open(path).read(slice(None)) for path in (files_path,
                                                                          shards_path))
    return {"rows": len(files), "indices_equal": bool(np.array_equal(files.indices,
                                                                     shards.indices)),
            "max_abs_dp": float(np.abs(files.probs - shards.probs).max()),
            "valid_rows": int((files.valid & shards.valid).sum())}


def part_shards(rec: Recorder, cfg: dict, ctx) -> None:
    """The teacher pass reading its images from tar shards (IN-22k's layout: the workers
    read each batch's rows as byte ranges, DALI ``mixed`` decodes them on the GPU) against
    the same JPEGs as files, end to end, one view, per decoder; and whether the labels are
    the same (target: the same top-k, >= 1.0x the files' img/s)."""
    import teacher_infer_bench as tb

    _torch_threads(cfg)
    _teacher_images(cfg, ctx)
    packed = rec.measure("pack", lambda: tb.pack_shards(
        ctx.images, os.path.join(ctx.work, f"shards-{cfg['teacher']['images']}"),
        cfg["shards"]["per_shard"]))
    if packed is None:
        return
    rec.note(views=1, model=cfg["teacher"]["model"], images=cfg["teacher"]["images"],
             dali_device="mixed" if cfg["device"] == "cuda" else "cpu")
    for decoder in ctx.decoders:
        paths = {}
        for layout, data in (("files", ctx.images), ("shards", packed["folder"])):
            paths[layout] = os.path.join(ctx.work, "stores", f"shards-{decoder}-{layout}.zarr")
            rec.measure(f"{decoder}/{layout}", lambda data=data, path=paths[layout]:
                        tb.end_to_end(_teacher_args(cfg, 1), data, path, decoder))
        if all(_complete(path) for path in paths.values()):
            rec.measure(f"{decoder}/labels", lambda: _same_labels(paths["files"],
                                                                  paths["shards"]))


def _compare_stores(reference_path: str, other_path: str, reference: str = "pil") -> dict:
    """Two stores of the same images, weights and view boxes (DALI vs PIL, bf16 vs fp32):
    how far the second's top-k is from the reference's (named ``reference`` in the keys)."""
    import numpy as np

    import labelstore

    first, second = labelstore.open(reference_path), labelstore.open(other_path)
    if list(first.keys) != list(second.keys):
        raise ValueError(f"{reference_path} and {other_path} hold different images")
    a, b = first.read(slice(None)), second.read(slice(None))
    valid = a.valid & b.valid
    top1_a, top1_b = a.indices[valid, :, 0], b.indices[valid, :, 0]
    max_dp = 0.0
    for view in range(first.num_views):  # dense (N, C) per view: bounded memory
        max_dp = max(max_dp, float(np.abs(first.dense(slice(None), view=view)[valid]
                                          - second.dense(slice(None), view=view)[valid]).max()))
    # the share of each view-row's stored top-k classes that the other store keeps too
    shared = (a.indices[valid][..., :, None] == b.indices[valid][..., None, :]).any(-1)
    return {"rows": int(valid.sum()), "views": first.num_views,
            "view_rows": int(top1_a.size), "invalid_rows": int((~valid).sum()),
            "top1_equal_rate": float((top1_a == top1_b).mean()),
            "top1_equal_rate_view0": float((top1_a[:, 0] == top1_b[:, 0]).mean()),
            "topk": first.topk, "topk_overlap": float(shared.mean()),
            "max_abs_dp": max_dp,
            "max_abs_dp_top1": float(np.abs(a.probs[valid, :, 0] - b.probs[valid, :, 0]).max()),
            "boxes_equal": bool(np.array_equal(a.boxes, b.boxes)),
            "flips_equal": bool(np.array_equal(a.flips, b.flips)),
            # how much the (random-weights) teacher's answer depends on the image: a flat
            # teacher would make any agreement figure meaningless
            f"{reference}_mean_top1_prob": float(a.probs[valid, :, 0].mean()),
            f"{reference}_distinct_top1": int(len(np.unique(top1_a)))}


def part_agreement(rec: Recorder, cfg: dict, ctx) -> None:
    import teacher_infer_bench as tb

    if set(ctx.decoders) != {"dali", "pil"}:
        rec.skip("agreement", f"needs both decoders, got --decoders {','.join(ctx.decoders)}")
        return
    _torch_threads(cfg)
    _teacher_images(cfg, ctx)
    for views in cfg["teacher"]["views"]:
        paths = {d: _store_path(ctx, d, views) for d in ("pil", "dali")}
        for decoder, path in paths.items():
            if not _complete(path):  # the teacher part did not leave it: write it here
                rec.measure(f"v{views}/store/{decoder}", lambda: tb.end_to_end(
                    _teacher_args(cfg, views), ctx.images, path, decoder))
        rec.measure(f"v{views}", lambda: _compare_stores(paths["pil"], paths["dali"]))


def part_precision(rec: Recorder, cfg: dict, ctx) -> None:
    """The teacher's top-k with bf16 autocast against fp32 (TF32 matmuls on a GPU, as
    ``--precision fp32`` runs there): the same images, weights, decoder and boxes. The
    evidence for ``infer-teacher --precision auto`` = bf16 on a GPU, and its speed-up."""
    import teacher_infer_bench as tb

    _torch_threads(cfg)
    _teacher_images(cfg, ctx)
    decoder, views = ctx.decoders[0], max(cfg["teacher"]["views"])  # the random views too
    rec.note(decoder=decoder, views=views, model=cfg["teacher"]["model"],
             images=cfg["teacher"]["images"])
    paths = {}
    for precision in ("fp32", "bf16"):
        paths[precision] = os.path.join(ctx.work, "stores", f"precision-{precision}.zarr")
        args = _teacher_args(cfg, views)
        args.precision = precision
        rec.measure(f"store/{precision}", lambda args=args, path=paths[precision]: tb.end_to_end(
            args, ctx.images, path, decoder))
    rec.measure("bf16_vs_fp32", lambda: _compare_stores(paths["fp32"], paths["bf16"],
                                                        reference="fp32"))


def part_augment(rec: Recorder, cfg: dict, ctx) -> None:
    """Teacher throughput with replayed augmentation (issue 25) against crop-only views, end
    to end, 4 views, per decoder: with DALI the records are applied on the device after
    decoding and a mixed view's partner is decoded too (target >= 0.9x of crop only on the
    GPU); with PIL the workers apply them."""
    import dataclasses

    import teacher_infer_bench as tb

    _torch_threads(cfg)
    _teacher_images(cfg, ctx)
    views = max(cfg["teacher"]["views"])
    rec.note(views=views, model=cfg["teacher"]["model"], images=cfg["teacher"]["images"],
             settings=AUGMENT_SETTINGS)
    for decoder in ctx.decoders:
        for name, settings in AUGMENT_SETTINGS.items():
            path = os.path.join(ctx.work, "stores", f"augment-{decoder}-{len(settings)}.zarr")
            args = _teacher_args(cfg, views)
            run_cfg = dataclasses.replace(tb.config(args, ctx.images, path, decoder), **settings)
            rec.measure(f"{decoder}/{name}", lambda args=args, path=path, run_cfg=run_cfg:
                        tb.end_to_end(args, ctx.images, path, decoder, run_cfg))


def _train_store(cfg: dict, ctx) -> tuple[str, str]:
    """The training JPEGs and their 4-view store, cached in the work folder."""
    import train_bench

    t = cfg["train"]
    width, height = t["image_size"]
    folder = os.path.join(ctx.work, f"train-{t['images']}-{width}x{height}-{t['input_size']}")
    store = os.path.join(folder, "train.zarr")
    if not _complete(store):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        train_bench.make_data(folder, t["images"], t["image_size"], t["input_size"])
    return folder, store


def part_train(rec: Recorder, cfg: dict, ctx) -> None:
    import train_bench

    _torch_threads(cfg)
    t = cfg["train"]
    made = rec.measure("data", lambda: dict(zip(("folder", "store"), _train_store(cfg, ctx))))
    if made is None:
        return
    teachers = {}
    for name in t["teachers"]:
        path = os.path.join(ctx.work, "teachers", f"{name}.pt")
        if not os.path.exists(path):
            def save(name=name, path=path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.replace(train_bench.save_teacher(name, path + ".tmp"), path)  # never half
                return {"path": path, "bytes": os.path.getsize(path)}

            rec.measure(f"save_teacher/{name}", save)
        teachers[name] = path
    settings = dict(student=t["student"], teacher=t["teachers"][0], epochs=t["epochs"],
                    batch_size=t["batch_size"], input_size=t["input_size"],
                    workers=t["workers"], device=cfg["device"], precision=t["precision"],
                    threads=_threads(cfg))
    rec.note(settings=settings, teachers=list(t["teachers"]), images=t["images"],
             image_size=list(t["image_size"]), measured_epochs=t["epochs"] - 1)
    for decoder in ctx.decoders:  # DALI first: its figures are the point of the run
        for mode in TRAIN_MODES:
            for teacher in (t["teachers"] if mode == "online" else (None,)):
                label = f"online ({teacher})" if teacher else mode
                options = {**settings, "decoder": decoder, "teacher": teacher or settings[
                    "teacher"]}

                def one(mode=mode, options=options, teacher=teacher):
                    wall, cpu = train_bench.run_mode(mode, made["store"], made["folder"],
                                                     options, teachers.get(teacher))
                    return {"img_s": wall, "img_per_cpu_s": cpu}

                rec.measure(f"{decoder}/{label}", one)
    for name in t["teachers"]:
        rec.measure(f"forward_cost/{name}", lambda: {"teacher_over_student": (
            train_bench.forward_cost(name, settings)
            / train_bench.forward_cost(t["student"], settings))})


def _ssld(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), *args],
                          capture_output=True, text=True, timeout=max(1.0, timeout), cwd=ROOT)


def _failed(command: str, done: subprocess.CompletedProcess) -> str:
    """First line: ssld's own error (its last line on stderr); then the tail of stderr."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return (f"ssld {command} exited {done.returncode}: {lines[-1] if lines else ''}\n"
            + done.stderr[-1500:])


def part_quickstart(rec: Recorder, cfg: dict, ctx) -> None:
    q = cfg["quickstart"]
    work = os.path.join(ctx.work, "quickstart")
    args = ["quickstart", "--workdir", work, "--device", cfg["device"],
            "--teacher-epochs", str(q["teacher_epochs"]),
            "--student-epochs", str(q["student_epochs"]), "--select-k", str(q["select_k"])]

    def command():
        """The command line, its options checked against ``ssld quickstart --help``."""
        help_text = _ssld(["quickstart", "--help"], 30).stdout
        if "--decoder" in help_text:
            args.extend(["--decoder", "dali"])
        else:
            rec.note(decoder="ssld quickstart has no --decoder option: ran with its automatic "
                     "choice (DALI when importable for teacher inference; for training on a "
                     "GPU)")
        unknown = [a for a in args if a.startswith("--") and a not in help_text]
        if unknown:
            raise ValueError(f"ssld quickstart --help lists no {', '.join(unknown)}")
        return {"command": "ssld " + " ".join(args), "has_decoder_option": "--decoder" in args}

    if rec.measure("command", command) is None:
        return
    if q.get("skip_run"):
        rec.skip("run", q["skip_run"])
        return

    def run():
        shutil.rmtree(work, ignore_errors=True)  # a full run, not the reuse of an earlier one
        started = time.perf_counter()
        done = _ssld(args, rec.left_s() - 2)
        result = {"command": "ssld " + " ".join(args), "returncode": done.returncode,
                  "wall_s": round(time.perf_counter() - started, 2),
                  "stdout_tail": done.stdout[-3000:], "stderr_tail": done.stderr[-3000:]}
        if done.returncode != 0:
            raise RuntimeError(_failed("quickstart", done))
        with open(os.path.join(work, "quickstart.json")) as handle:
            result["quickstart"] = json.load(handle)
        result["decoders_used"] = _quickstart_decoders(work)
        return result

    rec.measure("run", run)


def _quickstart_decoders(work: str) -> dict:
    """Which decoder each step resolved to: stores record it, training runs' config.json too."""
    import labelstore

    used = {}
    for name in ("labeled", "pool", "val"):
        path = os.path.join(work, "stores", f"{name}.zarr")
        if os.path.exists(path):
            used[f"infer-teacher {name}"] = (labelstore.open(path).attrs.get("compute")
                                             or {}).get("decoder")
    for name in ("teacher", "student_labels", "student_ssld"):
        path = os.path.join(work, "runs", name, "config.json")
        if os.path.exists(path):
            with open(path) as handle:
                used[f"train {name}"] = json.load(handle)["resolved"].get("decoder")
    return used


def _dedup_stores(folder: str, queries: int, pool: int, dim: int) -> tuple[str, str, int]:
    """Query and pool stores with random unit embeddings; the first pool rows are noisy
    copies of queries (the pairs stage 1 must find)."""
    import numpy as np

    import labelstore

    rng = np.random.default_rng(0)
    query_embeddings = rng.standard_normal((queries, dim)).astype(np.float32)
    copies = min(queries, pool) // 2
    paths = []
    for name, rows in (("query", queries), ("pool", pool)):
        path = os.path.join(folder, f"{name}.zarr")
        keys = [f"{name}{i:07d}.jpg" for i in range(rows)]
        with labelstore.create(path, keys=keys, num_classes=10, topk=1, embedding_dim=dim,
                               overwrite=True) as writer:
            for start in range(0, rows, 65536):
                n = min(65536, rows - start)
                embeddings = rng.standard_normal((n, dim)).astype(np.float32)
                if name == "query":
                    embeddings = query_embeddings[start:start + n]
                else:
                    rows_here = np.arange(start, start + n)
                    planted = rows_here < copies      # pool row i copies query i
                    embeddings[planted] = query_embeddings[rows_here[planted]] + \
                        0.2 * rng.standard_normal((int(planted.sum()), dim))
                writer.write(start, np.zeros((n, 1, 1), np.int64), np.ones((n, 1, 1)),
                             embeddings=embeddings)
        paths.append(path)
    return paths[0], paths[1], copies


def part_dedup(rec: Recorder, cfg: dict, ctx) -> None:
    help_text = _ssld(["dedup", "--help"], 30).stdout
    if "--device" not in help_text:
        rec.skip("stage1", "ssld dedup has no --device option (the scale issue's GPU path has "
                 "not landed): stage 1 on the GPU not run")
        return
    d = cfg["dedup"]
    folder = os.path.join(ctx.work, "dedup")
    os.makedirs(folder, exist_ok=True)
    made = rec.measure("stores", lambda: dict(zip(("query", "pool", "planted"), _dedup_stores(
        folder, d["queries"], d["pool"], d["dim"]))))
    if made is None:
        return

    def stage1():
        out = os.path.join(folder, "pairs.txt")
        args = ["dedup", "--query", made["query"], "--pool", made["pool"], "--verify", "none",
                "--out", out, "--device", cfg["device"]]
        if _threads(cfg):
            args += ["--threads", str(_threads(cfg))]
        started = time.perf_counter()
        done = _ssld(args, rec.left_s() - 2)
        if done.returncode != 0:
            raise RuntimeError(_failed("dedup", done))
        with open(out) as handle:
            lines = [line for line in handle if line.strip() and not line.startswith("#")]
        return {"command": "ssld " + " ".join(args), "wall_s": round(
            time.perf_counter() - started, 2), "queries": d["queries"], "pool": d["pool"],
            "dim": d["dim"], "pairs": len(lines), "planted": made["planted"],
            "stdout_tail": done.stdout[-1500:]}

    rec.measure("stage1", stage1)


PART_FUNCTIONS = {"env": part_env, "images": part_images, "teacher": part_teacher,
                  "shards": part_shards, "agreement": part_agreement, "precision": part_precision,
                  "train": part_train, "quickstart": part_quickstart, "dedup": part_dedup,
                  "augment": part_augment}


# -- the driver -------------------------------------------------------------------------
def run_part(args, cfg: dict) -> None:
    """In the child process: run one part and record it."""
    ctx = SimpleNamespace(work=args.workdir, images=os.path.join(args.workdir, "images"),
                          decoders=args.decoders)
    os.makedirs(os.path.join(args.workdir, "stores"), exist_ok=True)
    rec = Recorder(args.part, os.path.join(args.out, "parts", f"{args.part}.json"),
                   args.deadline)
    try:
        PART_FUNCTIONS[args.part](rec, cfg, ctx)
    except Exception as exc:  # noqa: BLE001 - set-up of the part itself failed
        rec.record["errors"]["part"] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "traceback": traceback.format_exc().splitlines()[-25:]}
    rec.finish()


def _spawn(args, name: str, deadline: float) -> dict:
    """Run part ``name`` in a child process until ``deadline``; what happened to it."""
    command = [sys.executable, os.path.abspath(__file__), *args.argv, "--out", args.out,
               "--workdir", args.workdir, "--part", name, "--deadline", f"{deadline:.3f}"]
    log = open(os.path.join(args.out, "parts", f"{name}.log"), "w")
    started = time.time()
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # its workers die with it on a timeout
    try:
        returncode = child.wait(timeout=max(1.0, deadline - time.time()))
        outcome = {"returncode": returncode}
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        outcome = {"returncode": child.returncode, "timed_out": True}
    try:
        os.killpg(child.pid, signal.SIGKILL)  # loader workers or threads it left behind
    except (ProcessLookupError, PermissionError):
        pass
    log.close()
    outcome["wall_s"] = round(time.time() - started, 2)
    return outcome


def _load_part(args, name: str, outcome: dict) -> dict:
    path = os.path.join(args.out, "parts", f"{name}.json")
    try:
        with open(path) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        record = {"part": name, "results": {}, "errors": {}, "skipped": {}}
    record["process"] = outcome
    if outcome.get("timed_out") and record.get("finished"):
        record["process"]["note"] = "the part had finished; its process exited past the deadline"
    elif outcome.get("timed_out"):
        running = record.get("running")
        record["errors"]["timeout"] = {"error": f"killed at the part's deadline after "
                                       f"{outcome['wall_s']:.0f} s"
                                       + (f", while measuring {running}" if running else "")}
        record["status"] = "partial" if record["results"] else "error"
    elif outcome["returncode"] != 0 or record.get("status") in (None, "running"):
        with open(os.path.join(args.out, "parts", f"{name}.log")) as handle:
            tail = handle.read()[-2000:]
        record["errors"]["process"] = {"error": f"the part's process exited "
                                       f"{outcome['returncode']}", "log_tail": tail}
        record["status"] = "partial" if record["results"] else "error"
    write_json(path, record)
    return record


def _start_dmon(args):
    if args.smoke:
        return None, "not sampled: CPU smoke run"
    if not shutil.which("nvidia-smi"):
        return None, "not sampled: nvidia-smi not found"
    handle = open(os.path.join(args.out, "dmon.txt"), "w")
    # power/util/clocks/memory once a second, with date and time to align with the parts
    process = subprocess.Popen(["nvidia-smi", "dmon", "-s", "pucm", "-o", "DT", "-d", "1"],
                               stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return (process, handle), "dmon.txt"


def _stop_dmon(dmon) -> int:
    if dmon is None:
        return 0
    process, handle = dmon
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
    handle.close()
    with open(handle.name) as lines:
        return sum(1 for line in lines if line.strip() and not line.startswith("#"))


def drive(args, cfg: dict) -> dict:
    os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    started = time.time()
    end = started + (args.budget if args.budget is not None else cfg["budget_s"])
    dmon, dmon_note = _start_dmon(args)
    results = {"started": now_iso(), "mode": "smoke" if args.smoke else "gpu",
               "budget_s": round(end - started), "argv": args.argv, "config": cfg,
               "decoders": args.decoders, "parts": {}}
    try:
        for name in args.parts:
            left = end - time.time()
            if left < 5:
                record = {"part": name, "status": "skipped", "results": {}, "errors": {},
                          "skipped": {"part": f"global time budget of {results['budget_s']} s "
                                      f"spent ({left:.0f} s left)"}}
                write_json(os.path.join(args.out, "parts", f"{name}.json"), record)
            else:
                deadline = time.time() + min(cfg["caps"][name], left)
                print(f"[{time.time() - started:5.0f} s] {name} (deadline "
                      f"{deadline - time.time():.0f} s)", flush=True)
                record = _load_part(args, name, _spawn(args, name, deadline))
            results["parts"][name] = record
            write_json(os.path.join(args.out, "results.json"), results)
    finally:
        results["dmon"] = {"samples": _stop_dmon(dmon), "file": dmon_note}
    results["wall_s"] = round(time.time() - started, 1)
    results["finished"] = now_iso()
    write_json(os.path.join(args.out, "results.json"), results)
    return results


# -- the summary ------------------------------------------------------------------------
def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(part, measure, value, note) rows of the run."""
    rows: list[tuple[str, str, str, str]] = []
    parts = results["parts"]

    def status_rows(name: str, record: dict) -> None:
        for key, reason in record.get("skipped", {}).items():
            rows.append((name, key, "skipped", reason[:90]))
        for key, error in record.get("errors", {}).items():
            rows.append((name, key, "ERROR", error["error"].splitlines()[0][:90]))

    for name in PARTS:
        record = parts.get(name)
        if record is None:
            continue
        got = record.get("results", {})
        if name == "env":
            soft, acc = got.get("software", {}), got.get("accelerator", {})
            rows.append((name, "gpu", str(acc.get("gpu", "none")),
                         f"torch {soft.get('torch')}, timm {soft.get('timm')}, "
                         f"DALI {str(soft.get('nvidia.dali'))[:30]}"))
        elif name == "images" and "teacher_jpegs" in got:
            r = got["teacher_jpegs"]
            rows.append((name, "teacher JPEGs", str(r["images"]),
                         f"{r['generated']} generated in {r['wall_s']} s"))
        elif name == "teacher":
            for key, r in got.items():
                views = key.split("/")[0]
                floor = got.get(f"{views}/model_only", {}).get("img_s")
                ratio = f"{r['img_s'] / floor:.2f} of model-only" if floor else ""
                if "/end_to_end/" in key:
                    ratio += (f"; loop wait {r['wait_pct']:.1f}%, compute "
                              f"{r['compute_pct']:.1f}%, store+glue {r['overhead_pct']:.1f}%")
                rows.append((name, key, f"{r['img_s']:,.1f} img/s", ratio))
        elif name == "shards":
            for key, r in got.items():
                decoder, _, what = key.partition("/")
                if what in ("files", "shards"):
                    base = got.get(f"{decoder}/files", {}).get("img_s")
                    rows.append((name, key, f"{r['img_s']:,.1f} img/s",
                                 (f"{r['img_s'] / base:.2f}x files" if base else "")
                                 + f"; loop wait {r['wait_pct']:.1f}%"))
                elif what == "labels":
                    rows.append((name, key, f"top-k equal {r['indices_equal']}",
                                 f"max |dp| {r['max_abs_dp']:.2g} over {r['rows']} rows"))
        elif name == "agreement":
            for key, r in got.items():
                if key.startswith("v") and "top1_equal_rate" in r:
                    rows.append((name, f"{key} DALI vs PIL", f"top-1 {r['top1_equal_rate']:.4f}",
                                 f"max |dp| {r['max_abs_dp']:.4f} over {r['view_rows']} "
                                 f"view-rows, boxes equal {r['boxes_equal']}"))
        elif name == "precision" and "bf16_vs_fp32" in got:
            r = got["bf16_vs_fp32"]
            speed = {p: got.get(f"store/{p}", {}).get("img_s") for p in ("fp32", "bf16")}
            rows.append((name, "bf16 vs fp32", f"top-1 {r['top1_equal_rate']:.4f}",
                         f"top-{r['topk']} overlap {r['topk_overlap']:.4f}, max |dp| "
                         f"{r['max_abs_dp']:.4f} over {r['view_rows']} view-rows"
                         + (f"; {speed['bf16'] / speed['fp32']:.2f}x the fp32 img/s"
                            if speed["fp32"] and speed["bf16"] else "")))
        elif name == "augment":
            for key, r in got.items():
                decoder = key.split("/")[0]
                base = got.get(f"{decoder}/crop only", {}).get("img_s")
                rows.append((name, key, f"{r['img_s']:,.1f} img/s",
                             (f"{r['img_s'] / base:.2f}x crop only" if base else "")
                             + f"; loop wait {r['wait_pct']:.1f}%"))
        elif name == "train":
            for key, r in got.items():
                if "img_s" not in r:
                    continue
                decoder = key.split("/")[0]
                base = got.get(f"{decoder}/supervised", {}).get("img_s")
                rows.append((name, key, f"{r['img_s']:,.1f} img/s",
                             f"{r['img_s'] / base:.2f}x supervised" if base else ""))
            for key, r in got.items():
                if key.startswith("forward_cost/"):
                    rows.append((name, key, f"{r['teacher_over_student']:.1f}x", "teacher / "
                                 "student forward"))
        elif name == "quickstart" and "run" in got:
            r = got["run"]
            used = sorted(set(str(v) for v in r.get("decoders_used", {}).values()))
            rows.append((name, "end to end", f"{r['wall_s']:.1f} s",
                         f"decoders used: {', '.join(used)}"))
        elif name == "dedup" and "stage1" in got:
            r = got["stage1"]
            rows.append((name, "stage 1", f"{r['wall_s']:.1f} s",
                         f"{r['queries']} x {r['pool']} x {r['dim']}, {r['pairs']} pairs"))
        status_rows(name, record)
        if not got and not record.get("skipped") and not record.get("errors"):
            rows.append((name, "part", "EMPTY", "recorded nothing"))
    return rows


def print_summary(results: dict) -> str:
    rows = [("part", "measure", "value", "note")] + summary_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * min(120, sum(widths) + 40))
    lines.append(f"\n{results['mode']} run, {results['wall_s']} s of a {results['budget_s']} s "
                 f"budget; nvidia-smi dmon: {results['dmon']['samples']} samples "
                 f"({results['dmon']['file']})")
    text = "\n".join(lines)
    print(text)
    return text


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU (DALI's CPU mode); what the test runs")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results",
                        help="where the JSON goes [$OUT, else ./gpu-results]")
    parser.add_argument("--workdir", help="generated images, stores, runs; reused by a rerun "
                        "[a folder under the system temp dir]")
    parser.add_argument("--budget", type=float, help="seconds for the whole run [GPU 345, "
                        "smoke 540]; parts that do not fit are skipped with the reason")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--decoders", default="dali,pil", help="[dali,pil]")
    parser.add_argument("--allow-missing-dali", action="store_true",
                        help="run the GPU mode even when nvidia.dali cannot be imported")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.decoders = [d for d in args.decoders.split(",") if d]
    if set(args.parts) - set(PARTS):
        parser.error(f"--parts: unknown {sorted(set(args.parts) - set(PARTS))}")
    if not args.decoders or set(args.decoders) - {"dali", "pil"}:
        parser.error("--decoders takes dali, pil or dali,pil")
    args.out = os.path.abspath(args.out)
    args.workdir = os.path.abspath(args.workdir or os.path.join(
        tempfile.gettempdir(), f"ssld-gpu-work-{'smoke' if args.smoke else 'gpu'}"))
    return args


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    cfg = SMOKE if args.smoke else GPU
    if args.part:
        run_part(args, cfg)
        # Everything is on disk: skip the interpreter's teardown of DALI pipelines and
        # loader workers, which can take seconds past the deadline on a busy machine.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if not args.smoke and "dali" in args.decoders and not args.allow_missing_dali \
            and not _importable("nvidia.dali"):
        print("benchmarks/gpu/run.py: nvidia.dali is not importable; stage it first (see "
              "benchmarks/gpu/README.md) or pass --decoders pil / --allow-missing-dali",
              file=sys.stderr)
        return 2
    results = drive(args, cfg)
    text = print_summary(results)
    with open(os.path.join(args.out, "summary.txt"), "w") as handle:
        handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
