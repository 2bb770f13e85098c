"""Student training throughput: stored labels vs plain supervised vs online distillation.

Run (CPU, this machine):  python benchmarks/train_bench.py
Run (GPU, prepared):      python benchmarks/train_bench.py --gpu

Every mode trains the same student on the same generated JPEGs through the same pipeline
(``student_train.train``: decoding, crops, DataLoader or DALI, loop, checkpoints):

- ``supervised``      hard labels from the store, RandomResizedCrop + flip, CE
- ``stored (global)`` the same crops, targets = the store's view-0 teacher distribution, JS
- ``stored (replay)`` crops replayed from the store's 4 views, their targets, JS
- ``online``          the same crops as supervised, a teacher ~5x the student's forward cost
                      run on every batch (eval mode, no grad), JS

Each mode trains ``--epochs`` epochs; the epochs after the first are measured (start-up
and first-step costs excluded). Modes are interleaved over ``--repeats`` rounds, in an order
that rotates each round, and medians are reported. The development machine is shared with
other jobs, so wall-clock images/s swings by 2-3x between identical runs there; the CPU
variant therefore decodes in the training process (``num_workers=0``) on one torch thread and
also reports images per CPU-second of that process (``time.process_time``), which other jobs
disturb less. A third figure isolates what stored labels add per image (row read + dense
target, the JS loss instead of CE) and divides it by the supervised CPU time per image.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from labelstore_bench import teacher_like_rows, timed  # noqa: E402

CPU = dict(student="resnet10t", teacher="resnet101", images=192, image_size=(256, 192),
           input_size=64, batch_size=32, workers=0, epochs=3, repeats=5, device="cpu",
           decoder="pil", precision="fp32", threads=1)
# MobileNetV3-large student, ResNet50d teacher, DALI decoding, bf16 (53 s on one H200 with
# --decoder pil; see docs/benchmarks.md).
GPU = dict(student="mobilenetv3_large_100", teacher="resnet50d", images=4096,
           image_size=(500, 375), input_size=224, batch_size=256, workers=8, epochs=3,
           repeats=1, device="cuda", decoder="dali", precision="bf16", threads=None)
CLASSES, TOPK, VIEWS = 1000, 10, 4


def _write_jpeg(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, width, height, seed = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_data(work: str, images: int, size: tuple[int, int], input_size: int) -> str:
    """JPEGs (landscape and portrait) and a complete 4-view, k=10, 1000-class store."""
    import labelstore
    from teacher_infer.imaging import ViewSpec, plan_views

    keys, top1, indices, probs, _ = teacher_like_rows(images, TOPK, CLASSES, seed=0)
    keys = [f"img{i:06d}.jpg" for i in range(images)]
    root = os.path.join(work, "images")
    os.makedirs(root)
    shapes = [size if i % 3 else size[::-1] for i in range(images)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_jpeg, [(os.path.join(root, k), w, h, i)
                                    for i, (k, (w, h)) in enumerate(zip(keys, shapes))],
                      chunksize=64))
    spec = ViewSpec(views=VIEWS, input_size=(input_size, input_size), crop_pct=0.875)
    planned = [plan_views(k, h, w, spec) for k, (w, h) in zip(keys, shapes)]
    store = os.path.join(work, "train.zarr")
    with labelstore.create(store, keys=keys, num_classes=CLASSES, topk=TOPK, views=VIEWS,
                           labels=top1, attrs={"dataset": {"root": root}}) as writer:
        writer.write(0, np.repeat(indices, VIEWS, 1), np.repeat(probs, VIEWS, 1),
                     boxes=np.stack([b for b, _ in planned]),
                     flips=np.stack([f for _, f in planned]))
    return store


def run_mode(mode: str, store: str, work: str, settings: dict,
             teacher_file: str) -> tuple[float, float]:
    """Train one mode: (images per wall second, images per CPU second of this process) over
    the epochs after the first."""
    import student_train.trainer as trainer
    from student_train import TrainConfig, train

    out = tempfile.mkdtemp(prefix=f"{mode.split()[0]}-", dir=work)
    options = dict(student=settings["student"], out=out, stores=(store,),
                   epochs=settings["epochs"], batch_size=settings["batch_size"],
                   input_size=settings["input_size"], num_workers=settings["workers"],
                   device=settings["device"], decoder=settings["decoder"],
                   precision=settings["precision"], warmup_epochs=0, lr=0.1,
                   threads=settings.get("threads"))
    extra = {"supervised": dict(supervised=True), "stored (global)": dict(views="global"),
             "stored (replay)": dict(views="replay"),
             "online": dict(teacher=settings["teacher"], teacher_checkpoint=teacher_file)}[mode]
    epochs, one_epoch = [], trainer.train_one_epoch

    def measured(*args, **kwargs):
        cpu = time.process_time()
        stats = one_epoch(*args, **kwargs)
        epochs.append((stats.images, stats.seconds, time.process_time() - cpu))
        return stats

    trainer.train_one_epoch = measured
    try:
        train(TrainConfig(**options, **extra))
    finally:
        trainer.train_one_epoch = one_epoch
        shutil.rmtree(out)
    images, wall, cpu = (sum(column) for column in zip(*epochs[1:]))
    return images / wall, images / cpu


def isolated_target_cost(store: str, settings: dict) -> dict:
    """Per image: seconds the stored targets add in the worker (row read from the loaded
    store + its sparse target, ``StoreDataset.target``) and in the loss (JS instead of
    label-smoothed CE)."""
    import torch

    from student_train import StoreDataset
    from student_train.distributed import setup
    from student_train.losses import js_divergence
    from student_train.models import data_config_for

    setup("cpu", settings.get("threads"))
    crops = StoreDataset(store, data_config_for(settings["student"], settings["input_size"]),
                         crop="random")
    samples = crops.samples
    rows = min(len(samples), 256)

    def read_and_densify() -> None:
        for i in range(rows):
            crops.target(samples.stores[0].read(int(samples.rows[i])), 0, i)

    batch = settings["batch_size"]
    logits = torch.randn(batch, CLASSES, requires_grad=True)
    teacher = torch.softmax(torch.randn(batch, CLASSES) * 3, -1)
    labels = torch.randint(0, CLASSES, (batch,))
    js = timed(lambda: js_divergence(logits, teacher).backward(), 20) / batch
    ce = timed(lambda: torch.nn.functional.cross_entropy(
        logits, labels, label_smoothing=0.1).backward(), 20) / batch
    return {"target_s": timed(read_and_densify, 1) / rows, "loss_extra_s": max(js - ce, 0.0)}


def forward_cost(name: str, settings: dict) -> float:
    """Seconds of one eval-mode forward of a batch: CPU seconds of this process on the CPU
    (robust to other jobs), synchronised wall seconds under bf16 autocast on a GPU."""
    import timm
    import torch

    device = torch.device(settings["device"])
    model = timm.create_model(name, num_classes=CLASSES).eval().to(device)
    size = settings["input_size"]
    images = torch.randn(settings["batch_size"], 3, size, size, device=device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=settings["precision"] == "bf16")
    with torch.no_grad(), autocast:
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(5):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (clock() - start) / 5


def save_teacher(name: str, path: str) -> str:
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model(name, num_classes=CLASSES).state_dict(), path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU variant (needs CUDA)")
    parser.add_argument("--images", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--decoder", choices=["pil", "dali"],
                        help="[GPU dali, CPU pil]; pil where DALI is not installed")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="[GPU cuda, CPU cpu]; --gpu --device cpu is a dry run")
    parser.add_argument("--student")
    parser.add_argument("--teacher")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    settings = dict(GPU if args.gpu else CPU)
    settings.update({k: v for k, v in vars(args).items()
                     if k in ("images", "repeats", "epochs", "decoder", "device", "student",
                              "teacher", "input_size", "batch_size", "workers")
                     and v is not None})
    work = tempfile.mkdtemp(prefix="train-bench-")
    try:
        started = time.perf_counter()
        store = make_data(work, settings["images"], settings["image_size"],
                          settings["input_size"])
        teacher_file = save_teacher(settings["teacher"], os.path.join(work, "teacher.pt"))
        if settings["threads"]:
            import torch
            torch.set_num_threads(settings["threads"])
        modes = ["supervised", "stored (global)", "stored (replay)", "online"]
        wall: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        for round_number in range(settings["repeats"]):
            # rotate the order so that no mode always runs first (or after the slow one)
            shift = round_number % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                per_wall, per_cpu = run_mode(mode, store, work, settings, teacher_file)
                wall[mode].append(per_wall)
                cpu[mode].append(per_cpu)
        isolated = isolated_target_cost(store, settings) if not args.gpu else {}
        isolated["teacher_cost"] = (forward_cost(settings["teacher"], settings)
                                    / forward_cost(settings["student"], settings))
        report(settings, wall, cpu, isolated, time.perf_counter() - started, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(settings, wall, cpu, isolated, seconds, args) -> None:
    median = {name: {m: statistics.median(v) for m, v in rates.items()}
              for name, rates in (("wall", wall), ("cpu", cpu))}
    print(f"\nstudent {settings['student']} @ {settings['input_size']} px, batch "
          f"{settings['batch_size']}, {settings['images']} JPEGs "
          f"{settings['image_size'][0]}x{settings['image_size'][1]}, {settings['decoder']} "
          f"decoding, {settings['workers']} worker(s), {settings['threads'] or 'default'} torch "
          f"thread(s), {settings['precision']} on {settings['device']}; online teacher "
          f"{settings['teacher']}; median of {settings['repeats']} interleaved rounds "
          f"({seconds:.0f} s in all)\n")
    # on a GPU the process's CPU time says nothing about throughput: wall clock only there
    names = ("cpu", "wall") if settings["device"] == "cpu" else ("wall",)
    rounds = {"cpu": cpu, "wall": wall}
    label = {"cpu": "images/CPU-s", "wall": "images/s (wall)"}
    print("| mode | " + " | ".join(f"{label[n]} | vs supervised | rounds" for n in names) + " |")
    print("|---" * (1 + 3 * len(names)) + "|")
    for mode in wall:
        cells = [f"{median[n][mode]:.1f} | {median[n][mode] / median[n]['supervised']:.3f}x | "
                 + ", ".join(f"{v:.1f}" for v in rounds[n][mode]) for n in names]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    for name in names:
        m = median[name]
        print(f"{name}: stored labels (global) overhead vs supervised "
              f"{100 * (1 - m['stored (global)'] / m['supervised']):+.1f}%; offline over online "
              f"distillation {m['stored (global)'] / m['online']:.2f}x (replay "
              f"{m['stored (replay)'] / m['online']:.2f}x)")
    print(f"teacher forward / student forward: {isolated['teacher_cost']:.1f}x "
          f"(batch {settings['batch_size']} at {settings['input_size']} px)")
    if "target_s" in isolated:
        per_image = 1.0 / median["cpu"]["supervised"]
        extra = isolated["target_s"] + isolated["loss_extra_s"]
        print(f"isolated: row read + dense target {1e6 * isolated['target_s']:.0f} µs/image, JS "
              f"instead of CE {1e6 * isolated['loss_extra_s']:.1f} µs/image; together "
              f"{100 * extra / per_image:.2f}% of a supervised image's {1e3 * per_image:.1f} "
              "CPU-ms")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": settings, "wall": wall, "cpu": cpu, "median": median,
                       "isolated": isolated}, handle, indent=2)


if __name__ == "__main__":
    main()
