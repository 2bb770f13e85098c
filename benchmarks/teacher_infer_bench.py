"""Teacher-inference throughput: end to end vs model-only vs decode-only, PIL and DALI.

Run (CPU, this machine):
    python benchmarks/teacher_infer_bench.py [--images 256] [--model mobilenetv3_large_100]
Run (GPU; 45 s on one H200, add --decoders pil where DALI is not installed):
    python benchmarks/teacher_infer_bench.py --gpu [--images 6144]

All figures come from one run, as ratios against floors measured in the same run:

- model-only: the teacher's forward + softmax/top-k on pre-decoded, pre-normalised
  tensors already on the device (the best the loop could do with free decoding);
- decode-only: the same data path as the real run (DataLoader + PIL workers, or the
  DataLoader feeding the DALI pipeline), its output dropped;
- end to end: ``teacher_infer.run`` into a fresh store; the loop's own clocks split its
  time into waiting for data, compute (forward, top-k, copy back) and the rest (store
  writes, failure bookkeeping, glue), which is the overhead the issue bounds at 5 %.

Images are generated JPEGs of ImageNet-like size (mostly 500 x 375 and 375 x 500). With
``--shards`` the same JPEGs are also packed into WebDataset tar shards laid out like timm's
ImageNet-22k (:func:`pack_shards`) and the data path and the run are measured reading them
(the workers read each batch's rows as byte ranges) beside the files. On the CPU the model
runs on one torch thread by default (``--threads``); every figure is the best of
``--rounds`` interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 500)]  # (width, height)


def _write_jpeg(args) -> None:
    path, index = args
    from PIL import Image

    rng = np.random.default_rng(index)
    width, height = SIZES[index % len(SIZES)]
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))  # some texture, so JPEGs have real entropy
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_images(folder: str, count: int, processes: int) -> str:
    os.makedirs(folder, exist_ok=True)
    todo = [(os.path.join(folder, f"img{i:06d}.jpg"), i) for i in range(count)
            if not os.path.exists(os.path.join(folder, f"img{i:06d}.jpg"))]
    if todo:
        with Pool(processes) as pool:
            pool.map(_write_jpeg, todo, chunksize=16)
    return folder


def pack_shards(images: str, folder: str, per_shard: int) -> dict:
    """The JPEGs of ``images`` (:func:`make_images`) as shards laid out like timm's
    ImageNet-22k (webdataset's ``TarWriter``: ``KEY.jpg`` + ``KEY.cls`` per sample, an
    ``_info.json``), in file order, made once; the same rows as the folder, in its order."""
    import webdataset as wds

    names = sorted(name for name in os.listdir(images) if name.endswith(".jpg"))
    shards = [names[lo:lo + per_shard] for lo in range(0, len(names), per_shard)]
    info = os.path.join(folder, "_info.json")
    if not os.path.exists(info):
        os.makedirs(folder, exist_ok=True)
        for number, part in enumerate(shards):
            path = os.path.join(folder, f"imagenet22k-train-{number:04d}.tar")
            with wds.TarWriter(path + ".tmp") as sink:
                for name in part:
                    with open(os.path.join(images, name), "rb") as handle:
                        sink.write({"__key__": name[:-len(".jpg")], "jpg": handle.read(),
                                    "cls": int(name[3:-4]) % 1000})
            os.replace(path + ".tmp", path)
        with open(info + ".tmp", "w") as handle:
            json.dump({"name": "teacher-jpegs", "splits": {"train": {
                "name": "train", "num_samples": len(names),
                "filenames": [f"imagenet22k-train-{n:04d}.tar" for n in range(len(shards))],
                "shard_lengths": [len(part) for part in shards]}}}, handle)
        os.replace(info + ".tmp", info)  # last: its presence says the shards are whole
    return {"folder": folder, "shards": len(shards), "samples": len(names),
            "bytes": sum(os.path.getsize(os.path.join(folder, name))
                         for name in os.listdir(folder) if name.endswith(".tar"))}


def config(args, data: str, out: str, decoder: str):
    from teacher_infer import InferConfig

    return InferConfig(model=args.model, random_weights=True, data=data, out=out,
                       decoder=decoder, batch_size=args.batch_size, precision=args.precision,
                       views=args.views,
                       channels_last=args.channels_last, device=args.device, topk=10,
                       num_workers=args.workers, progress=False, overwrite=True,
                       threads=args.threads if args.device == "cpu" else None)


def pretrained_data_config(model: str) -> dict:
    """timm's eval preprocessing of ``model`` without building it."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    from teacher_infer import resolve_model_name

    return resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(
        resolve_model_name(model)).to_dict())


def model_only(args, data: str, out: str) -> float:
    """img/s of forward + top-k on pre-decoded tensors already on the device."""
    import torch

    from teacher_infer import ImageSource
    from teacher_infer.data import find_samples
    from teacher_infer.imaging import ViewDataset, collate, pixels_to_input
    from teacher_infer.infer import data_config_view_spec, make_forward, top_k
    from teacher_infer.model import load_teacher
    from teacher_infer.runtime import (Dist, allow_tf32, autocast, resolve_device,
                                       resolve_precision)

    cfg = config(args, data, out, "pil")
    device = resolve_device(cfg.device, Dist())
    allow_tf32(device)  # as the teacher pass does
    teacher = load_teacher(cfg, device)
    spec = data_config_view_spec(cfg, teacher.data_config)
    samples = find_samples(data)
    rows = max(1, args.batch_size // args.views)  # --batch-size counts views (batch_ranges)
    dataset = ViewDataset(ImageSource(samples.root), samples.keys[:rows], spec,
                          teacher.data_config["interpolation"], tar=samples.tar)
    batch = collate([dataset[i] for i in range(rows)])
    mean = torch.tensor(teacher.data_config["mean"], device=device)
    std = torch.tensor(teacher.data_config["std"], device=device)
    # every view of the batch in one forward, view-major as the loop feeds them
    x = pixels_to_input(batch.pixels.to(device), mean, std).flatten(0, 1)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    forward = make_forward(teacher.model, False, False)
    precision = autocast(resolve_precision(cfg.precision, device), device)
    batches = max(1, args.images // rows)

    def one() -> None:
        with precision:
            logits, _ = forward(x)
        top_i, top_p, _ = top_k(logits, cfg.topk, cfg.temperature)
        top_i.cpu(), top_p.cpu()  # as the loop does: results back on the host

    with torch.inference_mode():
        for _ in range(2):
            one()
        start = time.perf_counter()
        for _ in range(batches):
            one()
        seconds = time.perf_counter() - start
    return batches * rows / seconds


def decode_only(args, data: str, out: str, decoder: str, cfg=None,
                augment=None) -> float:
    """img/s of the real run's data path with the model left out (``cfg``: this benchmark's
    config by default; ``augment(cfg, samples, spec, data_config)``: the augmentation the
    loader applies, for benchmarks/augment_bench.py)."""
    import torch

    from teacher_infer.data import find_samples
    from teacher_infer.imaging import batch_ranges, resolve_decoder
    from teacher_infer.infer import data_config_view_spec, data_path
    from teacher_infer.runtime import Dist, resolve_device

    cfg = cfg or config(args, data, out, decoder)
    device = resolve_device(cfg.device, Dist())
    data_config = pretrained_data_config(args.model)  # no need to build the model here
    samples = find_samples(data)
    batches = batch_ranges([(0, len(samples))], args.batch_size, args.views)
    spec = data_config_view_spec(cfg, data_config)
    decoder_class = resolve_decoder(decoder, device)
    loader, decoding, _ = data_path(cfg, Dist(), samples, spec, data_config, decoder_class,
                                     batches, device, None,
                                     augment and augment(cfg, samples, spec, data_config))
    count = 0
    start = time.perf_counter()
    for batch, images in decoding.decode(iter(loader)):
        count += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def end_to_end(args, data: str, out: str, decoder: str, cfg=None) -> dict:
    """``teacher_infer.run`` of ``cfg`` (default: this benchmark's config) and its figures."""
    from teacher_infer import run

    summary = run(cfg or config(args, data, out, decoder))
    details = summary.details
    loop = details["loop_s"]
    rest = loop - details["wait_s"] - details["compute_s"]
    return {"img_s": summary.images_per_s, "loop_s": loop,
            "wait_pct": 100 * details["wait_s"] / loop,
            "compute_pct": 100 * details["compute_s"] / loop,
            "store_pct": 100 * details["store_s"] / loop, "overhead_pct": 100 * rest / loop,
            "images": summary.images, "failures": summary.failures,
            "workers": details["num_workers"], "store_bytes": summary.store_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="GPU variant: resnext101_32x16d, bf16, channels_last, batch 256")
    parser.add_argument("--images", type=int, help="generated JPEGs [CPU 256, GPU 6144]")
    parser.add_argument("--model", help="teacher [CPU mobilenetv3_large_100, GPU "
                        "resnext101_32x16d]")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--views", type=int, default=1, help="views per image [1]")
    parser.add_argument("--workers", type=int, help="DataLoader workers [the run's default]")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="[cuda with --gpu, else cpu]; --gpu --device cpu is a dry run")
    parser.add_argument("--rounds", type=int, help="best of N for every figure [CPU 3, GPU 2]")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on the CPU [1: two spinning threads on a shared "
                        "two-core machine make every figure noise]")
    parser.add_argument("--workdir", help="where the images and stores go [a temp dir]")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--decoders", default="pil,dali",
                        help="comma-separated decoders to measure [pil,dali]")
    parser.add_argument("--shards", action="store_true",
                        help="also read the images from IN-22k-like tar shards (1,024 a shard)")
    args = parser.parse_args()
    args.decoders = [d for d in args.decoders.split(",") if d]
    if not args.decoders or set(args.decoders) - {"pil", "dali"}:
        parser.error("--decoders takes pil, dali or pil,dali")
    if args.gpu:
        defaults = dict(images=6144, model="resnext101_32x16d", batch_size=256, precision="bf16",
                        channels_last=True, device="cuda", rounds=2)
    else:
        defaults = dict(images=256, model="mobilenetv3_large_100", batch_size=32,
                        precision="fp32", channels_last=False, device="cpu", rounds=3)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    workdir = args.workdir or tempfile.mkdtemp(prefix="teacher_bench_")
    started = time.perf_counter()
    data = make_images(os.path.join(workdir, "images"), args.images, os.cpu_count() or 1)
    print(f"{args.images} JPEGs in {data} ({time.perf_counter() - started:.1f} s)", flush=True)
    out = os.path.join(workdir, "store.zarr")
    layouts = {"files": data}
    if args.shards:
        layouts["shards"] = pack_shards(data, os.path.join(workdir, "shards"), 1024)["folder"]

    import torch
    if "dali" in args.decoders:
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            sys.exit("teacher_infer_bench: DALI is not installed; pass --decoders pil")

    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    # a run of each decoder on each layout: "pil", and "pil, shards" beside it
    measured = [(d if layout == "files" else f"{d}, {layout}", d, path)
                for d in args.decoders for layout, path in layouts.items()]
    figures: dict = {"model_only": 0.0, **{f"decode_{name}": 0.0 for name, _, _ in measured}}
    runs: dict = {}
    # Interleaved rounds, best of each: the machine is shared, and on a GPU the first round
    # also pays for cuDNN's kernel search (kept for later rounds of this process).
    for _ in range(args.rounds):
        figures["model_only"] = max(figures["model_only"], model_only(args, data, out))
        for name, decoder, path in measured:
            key = f"decode_{name}"
            figures[key] = max(figures[key], decode_only(args, path, out, decoder))
            result = end_to_end(args, path, out, decoder)
            if name not in runs or result["img_s"] > runs[name]["img_s"]:
                runs[name] = result
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU, {torch.get_num_threads()} torch threads"
    print(f"\nteacher {args.model}, {args.precision}, batch {args.batch_size}, "
          f"{args.views} view(s), {args.images} images, {device}")
    print(f"{'measure':<34}{'img/s':>10}{'vs model-only':>15}")
    print(f"{'model only (pre-decoded tensors)':<34}{figures['model_only']:>10.1f}{1:>15.2f}")
    for decoder, _, _ in measured:
        name = f"decode only ({decoder})"
        print(f"{name:<34}{figures['decode_' + decoder]:>10.1f}"
              f"{figures['decode_' + decoder] / figures['model_only']:>15.2f}")
    for decoder, _, _ in measured:
        result = runs[decoder]
        name = f"end to end ({decoder})"
        print(f"{name:<34}{result['img_s']:>10.1f}{result['img_s'] / figures['model_only']:>15.2f}"
              f"   loop: wait {result['wait_pct']:.1f}%, compute {result['compute_pct']:.1f}%, "
              f"store+glue {result['overhead_pct']:.1f}% (store writes {result['store_pct']:.1f}%),"
              f" {result['workers']} workers")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "figures": figures, "runs": runs, "device": device},
                      handle, indent=2)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
