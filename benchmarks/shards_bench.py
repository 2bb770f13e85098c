"""Reading images from WebDataset tar shards vs the same images as a class folder.

Run (this machine, niced: it is shared):
    nice -n 19 python benchmarks/shards_bench.py [--images 20000] [--repeats 5]

Data: ``--images`` generated ImageNet-size JPEGs (500 x 375, noise-textured, ~110 KB), made
once into ``--cache`` (default /tmp/ssld-shards-bench, not the repository) in two layouts:
a class folder ``folder/<wnid>/<wnid>_<n>.JPEG`` and shards laid out like timm's IN-22k
(``imagenet22k-train-{0000..}.tar`` with ``.jpg`` + ``.cls`` members written by webdataset's
``TarWriter``, samples shuffled across classes, an ``_info.json``).

Measured in one run, every method against the folder, as ratios of images per second
(> 1: faster than the folder); each repeat runs the methods interleaved after reading both
layouts once (page cache warm), and the table gives the ratio of the best rates over
``--repeats`` and the median and range of the per-repeat ratios (the machine is shared):

- sequential (the teacher pass: every image once, in store order): the folder in its
  listing order; ``ShardReader.read_many`` (consecutive rows as one range in 8 MiB reads,
  rows sliced out) and with ``runs=False`` (row by row, one ``pread`` for the header and
  one for the image); webdataset's own reader
  (``webdataset.WebDataset``, raw bytes) and ``tarfile`` streaming, the naive alternatives;
- random access (replay: rows in a random order): the folder; ``ShardReader.read``; wids
  (``IndexedTarSamples``, mmap) and ``tarfile`` (``extractfile`` on a member table);
- bytes only, and bytes + PIL decode (``convert("RGB")``, on the first ``--decode``
  images of each order: decoding is ~40x the read and the same for every method);
- "warm": files in the page cache (the read path's own cost: system calls, copies,
  Python); "cold": both layouts' pages dropped before each method
  (``posix_fadvise(DONTNEED)``, no root needed), so the access pattern counts (bytes only).
  On a virtual machine the host may still cache what the guest dropped: the method order
  rotates from repeat to repeat, so that none is always the first to read from the disk.

Set-up that is done once per data set is timed apart and not in the ratios: listing the
shards (ours from the tar headers, ours from DALI ``.idx`` files made by DALI's
``wds2idx.py`` where DALI is installed, tarfile's ``getmembers``, wids's index), and
``build_index`` / ``load_index``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import sys
import tarfile
import time
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTH, HEIGHT = 500, 375
PER_SHARD = 2000       # samples per shard (timm's IN-22k: ~3,340)
CLASSES = 100
_NOISE: list[np.ndarray] = []


def _noise_fields(seed: int = 0, count: int = 8) -> list[np.ndarray]:
    """A few noise fields reused with random shifts: texture like a photo's, fast to make."""
    if not _NOISE:
        rng = np.random.default_rng(seed)
        _NOISE.extend(rng.normal(0, 1, (HEIGHT, WIDTH, 3)).astype(np.float32)
                      for _ in range(count))
    return _NOISE


def _jpeg(index: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (HEIGHT // 16 + 1, WIDTH // 16 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC),
                      dtype=np.float32)
    fields = _noise_fields()
    noise = np.roll(fields[index % len(fields)], (int(rng.integers(HEIGHT)),
                                                  int(rng.integers(WIDTH))), axis=(0, 1))
    amplitude = rng.uniform(16, 24)  # sizes spread around ~110 KB
    pixels = np.clip(base + amplitude * noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _names(count: int) -> list[tuple[str, str, int]]:
    """(wnid, key, label) per image: ImageNet-like synset ids and keys."""
    wnids = [f"n{1440764 + 7919 * c:08d}" for c in range(CLASSES)]
    return [(wnids[i % CLASSES], f"{wnids[i % CLASSES]}_{10000 + i}", i % CLASSES)
            for i in range(count)]


def _write_folder_part(args) -> None:
    root, part = args
    for index, (wnid, key, _) in part:
        path = os.path.join(root, "folder", wnid, key + ".JPEG")
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as handle:
                handle.write(_jpeg(index))
            os.replace(path + ".tmp", path)


def generate(cache: str, count: int, processes: int) -> dict:
    """Both layouts under ``cache`` (kept between runs); returns what was made."""
    marker = os.path.join(cache, "made.json")
    wanted = {"images": count, "per_shard": PER_SHARD, "classes": CLASSES, "version": 1}
    if os.path.exists(marker):
        with open(marker) as handle:
            if json.load(handle) == wanted:
                return wanted
    names = _names(count)
    for wnid in sorted({wnid for wnid, _, _ in names}):
        os.makedirs(os.path.join(cache, "folder", wnid), exist_ok=True)
    jobs = list(enumerate(names))
    parts = [(cache, jobs[i::processes * 8]) for i in range(processes * 8)]
    started = time.perf_counter()
    with Pool(processes) as pool:
        pool.map(_write_folder_part, parts)
    print(f"generated {count:,} JPEGs in {time.perf_counter() - started:.0f} s", flush=True)

    import webdataset as wds  # the field's writer: shards as webdataset/timm make them

    shard_dir = os.path.join(cache, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    order = list(range(count))
    random.Random(0).shuffle(order)  # timm's shards mix classes
    filenames, lengths = [], []
    for shard, start in enumerate(range(0, count, PER_SHARD)):
        name = f"imagenet22k-train-{shard:04d}.tar"
        with wds.TarWriter(os.path.join(shard_dir, name)) as writer:
            for index in order[start:start + PER_SHARD]:
                wnid, key, label = names[index]
                with open(os.path.join(cache, "folder", wnid, key + ".JPEG"), "rb") as handle:
                    writer.write({"__key__": key, "jpg": handle.read(),
                                  "cls": str(label).encode()})
        filenames.append(name)
        lengths.append(len(order[start:start + PER_SHARD]))
    info = {"name": "bench", "splits": {"train": {"name": "train", "num_samples": count,
                                                  "filenames": filenames,
                                                  "shard_lengths": lengths}}}
    with open(os.path.join(shard_dir, "_info.json"), "w") as handle:
        json.dump(info, handle)
    with open(marker, "w") as handle:
        json.dump(wanted, handle)
    return wanted


def make_dali_indexes(shard_dir: str) -> None:
    """DALI's own ``.idx`` beside each shard (its ``wds2idx.py``), where DALI is installed."""
    try:
        from wds2idx import IndexCreator
    except ImportError:
        return
    for name in sorted(os.listdir(shard_dir)):
        idx = os.path.join(shard_dir, name[:-len(".tar")] + ".idx")
        if name.endswith(".tar") and not os.path.exists(idx):
            with IndexCreator(os.path.join(shard_dir, name), idx + ".tmp", verbose=False) as ic:
                ic.create_index()
            os.replace(idx + ".tmp", idx)


def drop_cache(paths) -> None:
    """Ask the kernel to forget these files' pages (clean pages go; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rotated(table: dict, by: int) -> list:
    """The methods in an order that starts elsewhere each repeat: none always runs first
    (after the cache is dropped, or right after another method has filled a cache)."""
    items = list(table.items())
    by %= len(items)
    return items[by:] + items[:by]


def decode(data: bytes) -> int:
    from PIL import Image  # imported before the timed loops (main), so free here

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").size[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", type=int, default=2000,
                        help="images decoded per order in the decode measurements")
    parser.add_argument("--cache", default="/tmp/ssld-shards-bench")
    parser.add_argument("--processes", type=int, default=2, help="for generating only")
    parser.add_argument("--no-cold", action="store_true")
    args = parser.parse_args()

    import PIL.Image  # noqa: F401 - imported once, not inside the first timed decode
    import webdataset as wds
    from wids.wids import IndexedTarSamples

    from teacher_infer import shards as sh
    from teacher_infer.data import find_samples

    generate(args.cache, args.images, args.processes)
    shard_dir = os.path.join(args.cache, "shards")
    make_dali_indexes(shard_dir)

    # -- set-up, once per data set (best of 3, page cache warm) -------------------------
    def best_of(make, times=3):
        seconds = []
        for _ in range(times):
            clock = time.perf_counter()
            value = make()
            seconds.append(time.perf_counter() - clock)
        return value, min(seconds)

    source = os.path.join(shard_dir, "_info.json#train")
    folder, folder_s = best_of(lambda: find_samples(os.path.join(args.cache, "folder")))
    shard_set = sh.resolve_shards(source)
    samples, scan_s = best_of(lambda: sh.list_samples(shard_set, use_dali_index=False))
    urls = [shard.path for shard in samples.shards]
    costs = [f"folder listing {folder_s:.2f} s", f"ours, tar headers {scan_s:.2f} s"]
    if all(shard.dali_index for shard in shard_set.shards):
        via_idx, idx_s = best_of(lambda: sh.list_samples(shard_set))
        assert via_idx.keys == samples.keys and (via_idx.tar == samples.tar).all()
        costs.append(f"ours, DALI .idx {idx_s:.2f} s")
    index = os.path.join(args.cache, "index")
    shutil.rmtree(index, ignore_errors=True)
    _, build_s = best_of(lambda: sh.build_index(source, index), times=1)
    loaded, load_s = best_of(lambda: sh.load_index(index))
    assert loaded.keys == samples.keys
    costs += [f"build_index {build_s:.2f} s", f"load_index {load_s:.2f} s"]

    def tarfile_tables():
        opened = {url: tarfile.open(url) for url in urls}
        return opened, {url: {m.name: m for m in tar.getmembers()} for url, tar in opened.items()}

    (tars, tables), tarfile_s = best_of(tarfile_tables, times=1)
    wids, wids_s = best_of(lambda: {url: IndexedTarSamples(path=url) for url in urls}, times=1)
    costs += [f"tarfile getmembers {tarfile_s:.2f} s", f"wids index {wids_s:.2f} s"]
    n = len(samples)
    assert n == len(folder) == args.images
    print(f"{n:,} images, {samples.tar[:, 1].sum() / n / 1e3:.0f} KB mean, {len(urls)} shards; "
          f"set-up: {', '.join(costs)}", flush=True)

    # The same images in both layouts: folder path of each shard row.
    path_of = {key.rsplit("/", 1)[-1].split(".")[0]: folder.path(i)
               for i, key in enumerate(folder.keys)}
    sample_keys = [sh.split_key(key)[1] for key in samples.keys]
    row_paths = [path_of[key] for key in sample_keys]
    shard_index = np.searchsorted(samples.bounds, np.arange(n), side="right") - 1
    local_index = np.arange(n) - samples.bounds[shard_index]
    perm = np.random.default_rng(0).permutation(n)
    row_reader = samples.reader(runs=False)      # read_many row by row
    reader = samples.reader()                    # read_many's default: runs in 8 MiB reads

    def folder_read(paths):
        for path in paths:
            with open(path, "rb") as handle:
                yield handle.read()

    def ours_many(rows, source=reader):
        for _, data, error in source.read_many([samples.keys[i] for i in rows],
                                               samples.tar[rows]):
            if error is not None:
                raise error
            yield data

    def ours_rows(rows):
        for i in rows:
            yield reader.read(samples.keys[i], samples.tar[i])

    def wds_stream(count):
        dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        for number, sample in enumerate(dataset):
            if number == count:
                break
            yield sample["jpg"]

    def tarfile_stream(count):
        done = 0
        for url in urls:
            with tarfile.open(url, "r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        if done == count:
                            return
                        done += 1
                        yield tar.extractfile(member).read()

    def wids_random(rows):
        for i in rows:
            yield wids[urls[shard_index[i]]][int(local_index[i])][".jpg"].read()

    def tarfile_random(rows):
        for i in rows:
            url = urls[shard_index[i]]
            yield tars[url].extractfile(tables[url][sample_keys[i] + ".jpg"]).read()

    seq = np.arange(n)
    folder_seq = [folder.path(i) for i in range(n)]
    position = {path: i for i, path in enumerate(folder_seq)}

    def folder_first(count):
        """The images of the first ``count`` shard rows, in the folder's order (decoding
        compares the same images)."""
        return folder_seq if count == n else sorted(row_paths[:count], key=position.get)

    methods = {
        "sequential": {
            "folder": lambda k: folder_read(folder_first(k)),
            "ours: read_many, runs=False (row by row)": lambda k: ours_many(seq[:k], row_reader),
            "ours: read_many (runs in 8 MiB reads)": lambda k: ours_many(seq[:k]),
            "webdataset.WebDataset": wds_stream,
            "tarfile stream": tarfile_stream,
        },
        "random": {
            "folder": lambda k: folder_read([row_paths[i] for i in perm[:k]]),
            "ours: read by offset": lambda k: ours_rows(perm[:k]),
            "wids (mmap)": lambda k: wids_random(perm[:k]),
            "tarfile extractfile": lambda k: tarfile_random(perm[:k]),
        },
    }

    def timed(make, count, with_decode):
        clock = time.perf_counter()
        total = 0
        for data in make(count):
            total += decode(data) if with_decode else len(data)
        return count / (time.perf_counter() - clock), total

    def warm_up() -> None:
        """Both layouts into the page cache (the previous repeat's cold runs dropped them)."""
        for path in folder_seq + urls:
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass

    results: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        warm_up()
        if not wids:  # closed for the cold measurements of the previous repeat
            wids.update({url: IndexedTarSamples(path=url) for url in urls})
        for order, table in methods.items():
            for with_decode, count in ((False, n), (True, min(args.decode, n))):
                totals = set()
                for name, make in rotated(table, repeat):
                    rate, total = timed(make, count, with_decode)
                    totals.add(total)
                    results.setdefault((order, with_decode, name), []).append(rate)
                assert len(totals) == 1, f"methods read different bytes: {totals}"
        if not args.no_cold:
            # wids keeps every shard mapped, and the kernel keeps mapped pages cached
            for dataset in wids.values():
                dataset.close()
            wids.clear()
            shard_files = [shard.path for shard in samples.shards]
            random_paths = [row_paths[i] for i in perm]
            cold = {"sequential": {
                        "folder": lambda k: folder_read(folder_seq[:k]),
                        "ours: read_many, runs=False (row by row)":
                            lambda k: ours_many(seq[:k], row_reader),
                        "ours: read_many (runs in 8 MiB reads)": lambda k: ours_many(seq[:k])},
                    "random": {
                        "folder": lambda k: folder_read(random_paths[:k]),
                        "ours: read by offset": lambda k: ours_rows(perm[:k])}}
            for order, table in cold.items():
                for name, make in rotated(table, repeat):
                    drop_cache(folder_seq + shard_files)
                    for each in (reader, row_reader):
                        each.close()  # reopened shards read the dropped pages from disk
                    rate, _ = timed(make, n, False)
                    results.setdefault((order + " cold", False, name), []).append(rate)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    print("\n| order | read | method | img/s, best | vs folder, best | vs folder per repeat: "
          "median [min, max] |")
    print("|---|---|---|---|---|---|")
    for (order, with_decode, name), rates in results.items():
        folder_rates = results[(order, with_decode, "folder")]
        ratios = [rate / base for rate, base in zip(rates, folder_rates)]
        what = "bytes + decode" if with_decode else "bytes"
        print(f"| {order} | {what} | {name} | {max(rates):,.0f} | "
              f"{max(rates) / max(folder_rates):.2f}x | {statistics.median(ratios):.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] |")


if __name__ == "__main__":
    main()
