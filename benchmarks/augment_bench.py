"""Teacher-pass throughput with and without replayed augmentation (issue 25): crop only,
+ RandAugment and erasing, + MixUp/CutMix, on the PIL and DALI (CPU) paths.

Run (CPU, this machine):
    nice -n 19 python benchmarks/augment_bench.py [--images 96] [--views 4]

Two measures per setting, from the same process, as ratios to crop only in the same run:

- data path only: the run's own DataLoader and decoder (``teacher_infer.infer.data_path``)
  with the records applied — in the PIL workers, or on the device after DALI decodes — and
  the model left out: what augmentation costs the loader (a mixed view also decodes its
  partner's image, one extra image per row);
- end to end: ``teacher_infer.run`` into a fresh store, set-up excluded, with the loop's
  split into waiting for data, compute and the rest.

Images are ``teacher_infer_bench``'s generated JPEGs of ImageNet-like size; the teacher,
batch and threads are its CPU defaults (``mobilenetv3_large_100``, random weights, fp32, one
torch thread); every figure is the best of ``--rounds`` interleaved rounds. The GPU figure
(target >= 0.9x of crop only) is part ``augment`` of ``benchmarks/gpu/run.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import teacher_infer_bench as bench  # noqa: E402

SETTINGS = {
    "crop only": {},
    "+ RandAugment + erasing": dict(augment="rand-m9-n2-mstd0.5", erase=0.25),
    "+ MixUp/CutMix": dict(augment="rand-m9-n2-mstd0.5", erase=0.25, mixup=0.2, cutmix=1.0),
}


def config(args, data: str, out: str, decoder: str, setting: str):
    return dataclasses.replace(bench.config(args, data, out, decoder), **SETTINGS[setting])


def augmentation(cfg, samples, spec, data_config):
    """What the run's loader applies for ``cfg`` (None: crop only)."""
    from labelstore import DEFAULT_CHUNK_ROWS
    from teacher_infer import ImageSource
    from teacher_infer.imaging.augment import PlannedAugmentation, fill_from_mean

    settings = cfg.augment_spec(fill_from_mean(data_config["mean"]))
    if not settings.enabled:
        return None
    return PlannedAugmentation(settings, keys=samples.keys, images=ImageSource(samples.root),
                               tar=samples.tar, seed=spec.seed, chunk_rows=DEFAULT_CHUNK_ROWS,
                               views=spec.views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="DataLoader workers [the run's default]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decoders", default="pil,dali")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    args.decoders = [d for d in args.decoders.split(",") if d]
    args.precision, args.channels_last, args.device = "fp32", False, "cpu"

    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="augment_bench_")
    started = time.perf_counter()
    data = bench.make_images(os.path.join(workdir, "images"), args.images, os.cpu_count() or 1)
    out = os.path.join(workdir, "store.zarr")
    loader: dict = {}
    runs: dict = {}
    for _ in range(args.rounds):  # interleaved: the machine is shared
        for decoder in args.decoders:
            for setting in SETTINGS:
                key = (decoder, setting)
                loader[key] = max(loader.get(key, 0.0), bench.decode_only(
                    args, data, out, decoder, config(args, data, out, decoder, setting),
                    augmentation))
                result = bench.end_to_end(args, data, out, decoder,
                                          config(args, data, out, decoder, setting))
                if key not in runs or result["img_s"] > runs[key]["img_s"]:
                    runs[key] = result
    print(f"\nteacher {args.model}, fp32, batch {args.batch_size}, {args.views} views, "
          f"{args.images} images, CPU, {args.threads} torch thread(s), best of {args.rounds}")
    print(f"{'decoder':<8}{'setting':<26}{'data path img/s':>16}{'ratio':>7}"
          f"{'end to end img/s':>18}{'ratio':>7}   loop split")
    for decoder in args.decoders:
        base_loader = loader[(decoder, "crop only")]
        base_run = runs[(decoder, "crop only")]["img_s"]
        for setting in SETTINGS:
            result = runs[(decoder, setting)]
            print(f"{decoder:<8}{setting:<26}{loader[(decoder, setting)]:>16.1f}"
                  f"{loader[(decoder, setting)] / base_loader:>7.2f}{result['img_s']:>18.1f}"
                  f"{result['img_s'] / base_run:>7.2f}   wait {result['wait_pct']:.0f}%, "
                  f"compute {result['compute_pct']:.0f}%, store+glue "
                  f"{result['overhead_pct']:.1f}%")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
