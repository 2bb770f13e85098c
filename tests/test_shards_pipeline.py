"""ImageNet-22k as it ships, end to end (issue 24): WebDataset tar shards through the teacher
pass, select-topk, merge with a folder store, training, eval, verify and dedup.

The shards are laid out like timm's ``imagenet-22k-wds`` (webdataset's ``TarWriter``: a
``.jpg`` and a ``.cls`` member per sample, keys like ``n01440764_10026``, an ``_info.json``)
and hold real JPEGs of several sizes. The references are the same images unpacked:

- ``unpacked``: an ImageNet class folder (``WNID/KEY.jpg``): other keys (so other drawn
  views), compared sample by sample on the evaluation view;
- ``twin``: the files at ``SHARD.tar/KEY`` in a folder, listed by a list file with the
  ``cls`` labels, so its keys are the shards' store keys: every array (drawn views, records,
  mixing partners included), every selection and every trained weight must be equal.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import labelstore
from cli import main as cli_main
from conftest import SIZES, smooth_rgb
from student_train import TrainConfig, train
from teacher_infer import ImageSource, shards
from test_teacher_infer import (ONE_THREAD, REPO, _cli_args, infer, kill_after_chunks,
                                store_arrays)

try:  # the suite's moto S3 server (its tests skip without moto and s3fs)
    from test_labelstore_s3 import bucket, s3_env  # noqa: F401
except pytest.skip.Exception:  # pragma: no cover
    pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WNIDS = ["n01440764", "n01443537", "n01484850"]
PER_SHARD, SHARDS = 8, 3
AUGMENT = dict(augment="rand-m9-n2-mstd0.5", erase=0.5, mixup=0.8, cutmix=1.0, mix_prob=0.8)


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A real JPEG: a smooth picture with grain (SIFT finds keypoints in it: dedup)."""
    pixels = smooth_rgb(size[1], size[0], seed).astype(np.int16)
    pixels += np.random.default_rng(seed).integers(-20, 21, pixels.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_in22k(folder: Path, shards_count: int = SHARDS, per_shard: int = PER_SHARD, *,
                seed: int = 0) -> list[dict]:
    """timm's IN-22k shard layout under ``folder``; returns every sample (shard, key, label,
    bytes) in shard order."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    samples, names = [], []
    for shard in range(shards_count):
        name = f"imagenet22k-train-{shard:04d}.tar"
        names.append(name)
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(per_shard):
                number = shard * per_shard + i
                label = (number * 7 + seed) % len(WNIDS)
                key = f"{WNIDS[label]}_{10026 + number}"
                data = jpeg(1000 * seed + number, SIZES[number % len(SIZES)])
                sink.write({"__key__": key, "jpg": data, "cls": label})
                samples.append({"shard": name, "key": key, "label": label, "data": data})
    (folder / "_info.json").write_text(json.dumps({"name": "imagenet-22k", "splits": {
        "train": {"name": "train", "num_samples": len(samples), "filenames": names,
                  "shard_lengths": [per_shard] * shards_count}}}))
    return samples


def write_twin(folder: Path, samples: list[dict]) -> Path:
    """The samples as files ``SHARD/KEY`` (folders named like the shards) and a list file
    of ``SHARD/KEY LABEL`` lines: the shards' own keys, read from files."""
    lines = []
    for sample in samples:
        path = folder / sample["shard"] / sample["key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample["data"])
        lines.append(f"{sample['shard']}/{sample['key']} {sample['label']}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def write_labeled(folder: Path, seed: int) -> None:
    """A small labeled class folder (the L of SSLD) with the shards' classes."""
    for label, wnid in enumerate(WNIDS):
        for i in range(3):
            path = folder / wnid / f"{wnid}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(5000 + 10 * seed + 3 * label + i, SIZES[(label + i) % 6]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``shards/pool`` (the IN-22k-like shards) beside ``shards/train`` (L, a class folder);
    the same images as files under ``twin/`` (pool as ``SHARD.tar/KEY`` + a list file,
    train copied) and ``unpacked/`` (a class folder)."""
    base = tmp_path_factory.mktemp("in22k")
    samples = write_in22k(base / "shards" / "pool")
    write_labeled(base / "shards" / "train", seed=0)
    shutil.copytree(base / "shards" / "train", base / "twin" / "train")
    twin_list = write_twin(base / "twin" / "pool", samples)
    for sample in samples:
        path = base / "unpacked" / WNIDS[sample["label"]] / f"{sample['key']}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample["data"])
    return {"base": base, "samples": samples, "pool": base / "shards" / "pool",
            "train": base / "shards" / "train", "twin_pool": twin_list,
            "twin_train": base / "twin" / "train", "unpacked": base / "unpacked"}


def same_arrays(a, b, *, skip=("tar",)) -> None:
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    assert sorted(set(arrays_a) - set(skip)) == sorted(set(arrays_b) - set(skip))
    for name in arrays_a:
        if name not in skip:
            np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def stored_tar(path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["tar"][:])


# -- the teacher pass -------------------------------------------------------------------
def test_labels_from_shards_equal_the_unpacked_images_sample_by_sample(world, make_checkpoint,
                                                                       tmp_path):
    """One view (the evaluation crop, the same for any key), embeddings: the shards' store and
    the class folder's hold the same arrays for every sample; the keys differ by design
    (``SHARD/KEY`` vs ``WNID/KEY.jpg``), the labels are the same class ids."""
    checkpoint = str(make_checkpoint())
    options = dict(checkpoint=checkpoint, views=1, embeddings=True, decoder="pil",
                   chunk_rows=5)
    infer(world["pool"], tmp_path / "shards.zarr", **options)
    infer(world["unpacked"], tmp_path / "folder.zarr", **options)
    from_shards, from_folder = (labelstore.open(str(tmp_path / name))
                                for name in ("shards.zarr", "folder.zarr"))
    assert from_shards.attrs["dataset"]["source"] == "shards"
    assert from_shards.tar_fields == labelstore.TAR_FIELDS
    assert from_folder.tar_fields is None
    keys = [f"{s['shard']}/{s['key']}" for s in world["samples"]]
    assert from_shards.keys.tolist() == keys
    folder_row = {key: row for row, key in enumerate(from_folder.keys)}
    order = [folder_row[f"{WNIDS[s['label']]}/{s['key']}.jpg"] for s in world["samples"]]
    np.testing.assert_array_equal(from_shards.labels, [s["label"] for s in world["samples"]])
    np.testing.assert_array_equal(from_folder.labels[order], from_shards.labels)
    a, b = store_arrays(tmp_path / "shards.zarr"), store_arrays(tmp_path / "folder.zarr")
    for name in ("indices", "probs", "residual", "boxes", "flips", "valid", "embeddings"):
        np.testing.assert_array_equal(a[name], b[name][order], err_msg=name)
    assert a["valid"].all() and len(np.unique(a["indices"][:, 0, 0])) > 1
    # every row's image lies where the store says: the bytes written into the shards
    images = ImageSource(from_shards.attrs["dataset"]["root"])
    for row, sample in enumerate(world["samples"]):
        assert images.read(keys[row], a["tar"][row]) == sample["data"]


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_shards_and_their_files_give_the_same_store(world, make_checkpoint, tmp_path, decoder):
    """Drawn views, RandAugment, erasing and MixUp/CutMix with partners read from the shards
    (PIL in the workers; the DALI ``bytes`` path): every array equals the store of the same
    images read as files under the same keys."""
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    options = dict(checkpoint=str(make_checkpoint()), views=3, decoder=decoder, chunk_rows=6,
                   batch_size=6, **AUGMENT)
    infer(world["pool"], tmp_path / "shards.zarr", **options)
    infer(world["twin_pool"], tmp_path / "files.zarr", **options)
    same_arrays(tmp_path / "shards.zarr", tmp_path / "files.zarr")
    stored = labelstore.open(str(tmp_path / "shards.zarr"))
    mixed = stored.read_rows(slice(None), ("mix_partners",))["mix_partners"]
    assert (mixed >= 0).sum() > 10 and stored.valid.all()
    assert (stored_tar(tmp_path / "shards.zarr")[:, 0] >= 512).all()


@pytest.mark.slow
def test_dataloader_workers_read_the_shards_as_the_main_process(world, make_checkpoint,
                                                                tmp_path):
    """Two DataLoader worker processes, each with its own shard files, write the store the
    main process alone writes."""
    options = dict(checkpoint=str(make_checkpoint()), views=2, decoder="pil", chunk_rows=4,
                   batch_size=4)
    infer(world["pool"], tmp_path / "workers.zarr", num_workers=2, **options)
    infer(world["pool"], tmp_path / "main.zarr", **options)
    same_arrays(tmp_path / "workers.zarr", tmp_path / "main.zarr", skip=())


def test_the_index_command_and_every_spec_give_the_same_store(world, make_checkpoint,
                                                              tmp_path, capsys):
    """``ssld index`` (summary line; a rerun lists nothing) and then ``--data INDEX``, a brace
    pattern, ``_info.json#train``: one store, byte for byte (the listing is not a
    setting)."""
    index = tmp_path / "index"
    assert cli_main(["index", "--data", str(world["pool"]), "--out", str(index),
                     "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"index: {SHARDS * PER_SHARD} samples in "
                                              f"{SHARDS} shards ({SHARDS} listed)")
    assert cli_main(["index", "--data", str(world["pool"]), "--out", str(index),
                     "--no-progress"]) == 0
    assert f"0 listed, {SHARDS} kept from an earlier run" in capsys.readouterr().out
    checkpoint = str(make_checkpoint())
    specs = [str(index), f"{world['pool']}/imagenet22k-train-{{0000..{SHARDS - 1:04d}}}.tar",
             f"{world['pool']}/_info.json#train"]
    for number, spec in enumerate(specs):
        infer(spec, tmp_path / f"s{number}.zarr", checkpoint=checkpoint, views=2,
              decoder="pil", chunk_rows=8)
    for number in (1, 2):
        same_arrays(tmp_path / "s0.zarr", tmp_path / f"s{number}.zarr", skip=())


# -- select, merge with a folder store, train ---------------------------------------------
def _pipeline(world, checkpoint: str, out: Path, *, pool: str, train_images: str,
              decoder: str, val: str) -> dict:
    """infer L and U, select-topk on U, merge (L first), train a student: what each made."""
    options = dict(checkpoint=checkpoint, views=3, decoder="pil", chunk_rows=6, topk=2, **AUGMENT)
    infer(train_images, out / "L.zarr", **options)
    infer(pool, out / "U.zarr", **options)
    labelstore.select_topk(str(out / "U.zarr"), 2, str(out / "sel.zarr"))
    labelstore.merge([str(out / "L.zarr"), str(out / "sel.zarr")], str(out / "train.zarr"))
    result = train(TrainConfig(student="test_resnet", out=str(out / "run"),
                               stores=(str(out / "train.zarr"),), epochs=2, batch_size=8,
                               lr=0.2, warmup_epochs=0.5, input_size=32, num_workers=0,
                               device="cpu", threads=1, decoder=decoder, val=val))
    weights = torch.load(out / "run" / "last.pt", weights_only=True)["state_dict"]
    return {"result": result, "weights": weights}


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_select_merge_train_on_shards_equals_the_same_images_as_files(world, make_checkpoint,
                                                                      tmp_path, decoder):
    """SSLD's recipe: L from a class folder, U from shards, select-topk on U, merge, train
    with replayed views whose mixing partners are read from the shards (rows not selected:
    the partner table, which keeps their shard locations). The same pipeline on the same
    images as files gives the same selection, stores and trained weights, bit for bit, and
    ``--val`` on the shards the same accuracy as ``--val`` on their files."""
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    checkpoint = str(make_checkpoint(num_classes=len(WNIDS)))  # 2 per class: 6 of 24 kept
    (tmp_path / "s").mkdir()
    (tmp_path / "f").mkdir()
    on_shards = _pipeline(world, checkpoint, tmp_path / "s", pool=str(world["pool"]),
                          train_images=str(world["train"]), decoder=decoder,
                          val=str(world["pool"]))
    on_files = _pipeline(world, checkpoint, tmp_path / "f", pool=str(world["twin_pool"]),
                         train_images=str(world["twin_train"]), decoder=decoder,
                         val=str(world["twin_pool"]))
    merged = labelstore.open(str(tmp_path / "s" / "train.zarr"))
    twin = labelstore.open(str(tmp_path / "f" / "train.zarr"))
    assert merged.keys.tolist() == twin.keys.tolist()
    same_arrays(tmp_path / "s" / "train.zarr", tmp_path / "f" / "train.zarr")
    tar = merged.read_tar(slice(None))
    from_folder = np.array([key.startswith("train/") for key in merged.keys])
    assert from_folder.sum() == 3 * len(WNIDS) and (tar[from_folder] == -1).all()
    assert (tar[~from_folder, 0] >= 512).all()
    table = merged.partner_table()
    assert table is not None and len(table["keys"])  # partners that were not selected
    in_pool = np.array([key.startswith("pool/") for key in table["keys"]])
    assert in_pool.any() and (table["tar"][in_pool, 0] >= 512).all()
    assert (table["tar"][~in_pool] == -1).all()
    for name, value in on_shards["weights"].items():
        torch.testing.assert_close(value, on_files["weights"][name], rtol=0, atol=0,
                                   msg=name)
    assert on_shards["result"].best_top1 == on_files["result"].best_top1
    assert on_shards["result"].last["val_top1"] == on_files["result"].last["val_top1"]


def test_eval_on_shards_equals_eval_on_their_files(world, make_checkpoint, capsys):
    checkpoint = str(make_checkpoint(model="test_resnet", num_classes=len(WNIDS)))
    results = []
    for data in (world["pool"], world["twin_pool"]):
        assert cli_main(["eval", "--model", "test_resnet", "--checkpoint", checkpoint,
                         "--data", str(data), "--input-size", "32", "--num-workers", "0",
                         "--threads", "1", "--device", "cpu", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["images"] == SHARDS * PER_SHARD
    assert (results[0]["top1"], results[0]["top5"]) == (results[1]["top1"], results[1]["top5"])
    assert 0 < results[0]["top5"]  # labels from the cls members, compared for real


# -- resume, ranks, object storage ---------------------------------------------------------
@pytest.mark.slow
def test_resume_after_kill_on_shards_equals_an_uninterrupted_run(make_checkpoint, tmp_path,
                                                                 capsys):
    """SIGKILL a real teacher pass over shards once a few chunks are on disk; the same
    command resumes chunk by chunk and the store (shard locations included) equals an
    uninterrupted run."""
    write_in22k(tmp_path / "pool", 4, 16, seed=3)
    checkpoint = make_checkpoint()
    options = dict(chunk_rows=2, batch_size=2, views=2, decoder="pil", input_size=96)
    out = tmp_path / "killed.zarr"
    args = _cli_args(tmp_path / "pool", out, checkpoint, **options)
    done_at_kill = kill_after_chunks(args, out, 3)
    assert 3 <= done_at_kill < 32
    assert cli_main(args) == 0
    summary = capsys.readouterr().out
    assert f"{done_at_kill * 2:,} already done" in summary
    infer(tmp_path / "pool", tmp_path / "reference.zarr", checkpoint=str(checkpoint), **options)
    same_arrays(out, tmp_path / "reference.zarr", skip=())
    assert labelstore.open(str(out)).attrs["runs"][-1]["resumed"] is True


def _rank_spans(keys: list[str], tar: np.ndarray, rows: list[int], root: str) -> list:
    """The byte spans (path, start, stop) of ``rows``: runs of consecutive rows of a shard
    from the first one's tar header to the last one's end."""
    spans = []
    for row in rows:
        path = os.path.join(root, shards.split_key(keys[row])[0])
        start, stop = int(tar[row, 0]) - 512, int(tar[row, 0] + tar[row, 1])
        if spans and spans[-1][0] == path and spans[-1][3] == row - 1:
            spans[-1] = (path, spans[-1][1], stop, row)
        else:
            spans.append((path, start, stop, row))
    return [span[:3] for span in spans]


@pytest.mark.slow
def test_two_ranks_read_only_the_byte_ranges_of_their_own_rows(world, make_checkpoint,
                                                               tmp_path):
    """``ssld index`` under torchrun, then the teacher pass on two ranks from that index:
    every byte a rank reads from a shard lies inside the rows of its own chunks (no rank
    reads the data set), together they read each row once, and the store equals one
    process's."""
    index = tmp_path / "index"
    environ = dict(ONE_THREAD, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        SSLD_TEST_READS=str(tmp_path))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "cli", "index", "--data", str(world["pool"]),
                           "--out", str(index), "--no-progress"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("index: 24 samples in 3 shards (3 listed)") == 1
    checkpoint = make_checkpoint()
    options = dict(chunk_rows=4, batch_size=4, views=2, decoder="pil")
    args = _cli_args(index, tmp_path / "two.zarr", checkpoint, **options)
    done = subprocess.run([*torchrun, str(REPO / "tests" / "shard_reads_cli.py"), *args],
                          cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    infer(world["pool"], tmp_path / "one.zarr", checkpoint=str(checkpoint), **options)
    same_arrays(tmp_path / "two.zarr", tmp_path / "one.zarr", skip=())

    store = labelstore.open(str(tmp_path / "one.zarr"))
    keys, tar = store.keys.tolist(), store.read_tar(slice(None))
    chunks = [list(range(lo, min(lo + 4, len(keys)))) for lo in range(0, len(keys), 4)]
    image_bytes = 0
    for rank in (0, 1):
        rows = [row for chunk in chunks[rank::2] for row in chunk]
        spans = _rank_spans(keys, tar, rows, str(world["pool"]))
        reads = json.loads((tmp_path / f"reads.{rank}.json").read_text())
        assert reads, rank
        for path, start, stop in reads:
            assert any(path == p and a <= start and stop <= b for p, a, b in spans), \
                (rank, path, start, stop)
        read = sum(stop - start for _, start, stop in reads)
        mine = int(tar[rows, 1].sum())
        assert mine <= read <= sum(b - a for _, a, b in spans), rank
        image_bytes += read
    total = sum(os.path.getsize(world["pool"] / name) for name in
                {shards.split_key(key)[0] for key in keys})
    assert image_bytes < total  # headers and labels of no one's rows, and the tar ends, unread


def test_teacher_pass_and_training_from_s3_shards_equal_local_disk(world, make_checkpoint,
                                                                   tmp_path, request):
    """Shards in an S3 bucket (moto): listed by ranged GETs, read by the rows' byte ranges;
    the store equals the local one but for the shard stamps (ETag digests), and a student
    trained from it (its images read from S3) has the same weights."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    bucket_url = request.getfixturevalue("bucket")
    import fsspec

    fs, _ = fsspec.core.url_to_fs(bucket_url)
    for path in sorted(world["pool"].iterdir()):
        fs.put_file(str(path), f"{bucket_url[5:]}/in22k/{path.name}")
    remote = f"{bucket_url}/in22k"
    checkpoint = str(make_checkpoint(num_classes=len(WNIDS)))
    options = dict(checkpoint=checkpoint, views=2, decoder="pil", chunk_rows=5, topk=2,
                   **AUGMENT)
    infer(remote, tmp_path / "s3.zarr", **options)
    infer(world["pool"], tmp_path / "local.zarr", **options)
    same_arrays(tmp_path / "s3.zarr", tmp_path / "local.zarr")
    from_s3, local = stored_tar(tmp_path / "s3.zarr"), stored_tar(tmp_path / "local.zarr")
    np.testing.assert_array_equal(from_s3[:, :3], local[:, :3])
    assert (from_s3[:, 3] != local[:, 3]).all()
    assert labelstore.open(str(tmp_path / "s3.zarr")).attrs["dataset"]["root"] == remote
    weights = []
    for name in ("s3", "local"):
        train(TrainConfig(student="test_resnet", out=str(tmp_path / f"run-{name}"),
                          stores=(str(tmp_path / f"{name}.zarr"),), epochs=1, batch_size=8,
                          input_size=32, num_workers=0, device="cpu", threads=1))
        weights.append(torch.load(tmp_path / f"run-{name}" / "last.pt",
                                  weights_only=True)["state_dict"])
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)


# -- damage -------------------------------------------------------------------------------
def _members(shard: int, count: int = 3) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        key = f"{WNIDS[i % 3]}_{20000 + 10 * shard + i}"
        members += [(f"{key}.cls", f"{i % 3}\n".encode()), (f"{key}.jpg", jpeg(shard * 10 + i,
                                                                                 SIZES[i]))]
    return members


def _damaged(kind: str, folder: Path) -> tuple[str, str]:
    """Two good shards under ``folder`` and ``kind`` of damage: (--data, what the one-line
    error must say)."""
    from test_shards import write_tar

    paths = [write_tar(folder / f"imagenet22k-train-{s:04d}.tar", _members(s)) for s in (0, 1)]
    spec = str(folder)
    if kind == "missing shard":
        spec = f"{folder}/imagenet22k-train-{{0000..0002}}.tar"
        return spec, "shard .*imagenet22k-train-0002.tar does not exist"
    if kind == "truncated":
        paths[1].write_bytes(paths[1].read_bytes()[:3000])  # inside its second member
        return spec, "shard imagenet22k-train-0001.tar is truncated"
    if kind == "changed since indexed":
        shards.build_index(spec, str(folder.parent / "index"))
        write_tar(paths[1], _members(1)[:4])
        return str(folder.parent / "index"), ("shard imagenet22k-train-0001.tar changed since "
                                              "it was indexed")
    if kind == "sample without an image":
        write_tar(paths[1], _members(1) + [("n01440764_29999.cls", b"0\n")])
        return spec, "shard imagenet22k-train-0001.tar: sample 'n01440764_29999' has no image"
    if kind == "cls not an integer":
        members = _members(1)
        members[2] = (members[2][0], b"tench\n")
        write_tar(paths[1], members)
        return spec, "shard imagenet22k-train-0001.tar: sample .*: cls 'tench' is not an integer"
    if kind == "key repeated in a shard":
        members = _members(1)
        write_tar(paths[1], members + [(members[1][0].replace(".jpg", ".png"), members[1][1])])
        return spec, "shard imagenet22k-train-0001.tar: __key__ .* appears again"
    if kind == "key in two shards":
        write_tar(paths[1], _members(0))
        return spec, "__key__ .* is in shard imagenet22k-train-0000.tar and in shard " \
                     "imagenet22k-train-0001.tar"
    if kind == "pattern matching nothing":
        return f"{folder}/imagenet21k-*.tar", "imagenet21k-\\*.tar matches no .tar file"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing shard", "truncated", "changed since indexed",
                                  "sample without an image", "cls not an integer",
                                  "key repeated in a shard", "key in two shards",
                                  "pattern matching nothing"])
def test_damage_before_the_run_is_one_line_naming_the_shard(kind, make_checkpoint, tmp_path,
                                                            capsys):
    import re

    spec, message = _damaged(kind, tmp_path / "pool")
    out = tmp_path / "out.zarr"
    assert cli_main(_cli_args(spec, out, make_checkpoint())) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ssld: error: "), err
    assert re.search(message, err), err
    assert not out.exists()  # refused before anything was written


def _rename_member(path: Path, old: str, new: str) -> None:
    """Rename a member in place, same size and modification time (its header rewritten with
    its checksum): what no stamp can tell."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = tar.getmember(old)
    assert len(new) == len(old)
    header = member.offset_data - 512
    data[header:header + len(new)] = new.encode()
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = f"{sum(data[header:header + 512]):06o}\0 ".encode()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damage_during_the_run_fails_its_rows_only(make_checkpoint, tmp_path, monkeypatch):
    """Shards damaged after they were listed: one rewritten (its rows fail: changed since
    indexed), a member of another renamed in place at the same size and time (that row
    fails: its header names another member). failed.txt lists exactly them; every other
    row holds what an undamaged run holds — never another image's labels."""
    from test_shards import write_tar

    import teacher_infer.infer as infer_module

    paths = [write_tar(tmp_path / "pool" / f"imagenet22k-train-{s:04d}.tar", _members(s, 4))
             for s in (0, 1, 2)]
    checkpoint = str(make_checkpoint())
    infer(tmp_path / "pool", tmp_path / "clean.zarr", checkpoint=checkpoint, chunk_rows=4)
    listed = infer_module.find_samples

    def list_then_damage(*args, **kwargs):
        found = listed(*args, **kwargs)
        write_tar(paths[1], _members(1, 4)[:6])  # another version of the shard
        _rename_member(paths[2], "n01443537_20021.jpg", "n01443537_20029.jpg")
        return found

    monkeypatch.setattr(infer_module, "find_samples", list_then_damage)
    summary = infer(tmp_path / "pool", tmp_path / "damaged.zarr", checkpoint=checkpoint,
                    chunk_rows=4)
    assert summary.complete and summary.failures == 5
    failed = dict(line.split("\t") for line in
                  (tmp_path / "damaged.zarr" / "failed.txt").read_text().splitlines())
    assert sorted(failed) == sorted([f"imagenet22k-train-0001.tar/{key}" for key in
                                     ("n01440764_20010", "n01443537_20011", "n01484850_20012",
                                      "n01440764_20013")]
                                    + ["imagenet22k-train-0002.tar/n01443537_20021"])
    assert all("changed since it was indexed" in failed[key] for key in failed if "0001" in key)
    assert "'n01443537_20029.jpg', not n01443537_20021's image" in \
        failed["imagenet22k-train-0002.tar/n01443537_20021"]
    clean, damaged = (labelstore.open(str(tmp_path / name)) for name in
                      ("clean.zarr", "damaged.zarr"))
    ok = damaged.valid
    assert ok.sum() == 7
    for name in ("indices", "probs", "boxes"):
        np.testing.assert_array_equal(getattr(damaged.read(ok), name),
                                      getattr(clean.read(ok), name))


def test_training_refuses_a_changed_shard_and_skips_rows_of_one_that_changes(
        world, make_checkpoint, tmp_path, monkeypatch, capsys):
    """A shard changed since the teacher pass: train-student refuses before the first epoch,
    one line naming it (never other images' bytes under these labels). One that changes
    after that check: its rows are left out and listed in RUN_DIR/failed.txt."""
    import student_train.samples as samples_module

    shutil.copytree(world["pool"], tmp_path / "pool")  # copy2: the same times
    checkpoint = str(make_checkpoint(num_classes=len(WNIDS)))
    infer(tmp_path / "pool", tmp_path / "u.zarr", checkpoint=checkpoint, topk=2, views=2,
          chunk_rows=8)
    args = ["train-student", "--student", "test_resnet", "--store", str(tmp_path / "u.zarr"),
            "--epochs", "1", "--batch-size", "4", "--input-size", "32", "--num-workers", "0",
            "--threads", "1", "--device", "cpu"]
    assert cli_main([*args, "--out", str(tmp_path / "fine")]) == 0
    capsys.readouterr()
    shard = tmp_path / "pool" / "imagenet22k-train-0001.tar"
    shard.write_bytes(shard.read_bytes())  # the same bytes, another modification time
    assert cli_main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{PER_SHARD} of 24 images are missing" in err
    assert "imagenet22k-train-0001.tar changed since it was indexed (modification time)" in err
    # the check passed (as if the shard changed afterwards): the rows fail as they are read
    monkeypatch.setattr(samples_module, "require_images", lambda *args, **kwargs: None)
    assert cli_main([*args, "--out", str(tmp_path / "skipped"), "--bad-images", "skip"]) == 0
    left_out = (tmp_path / "skipped" / "failed.txt").read_text().splitlines()
    assert len(left_out) == PER_SHARD
    assert all("imagenet22k-train-0001.tar/" in line and "changed since it was indexed" in line
               for line in left_out)


# -- verify and dedup -----------------------------------------------------------------------
def test_verify_recomputes_rows_from_their_shards(world, make_checkpoint, tmp_path, capsys):
    shutil.copytree(world["pool"], tmp_path / "pool")
    infer(tmp_path / "pool", tmp_path / "u.zarr", checkpoint=str(make_checkpoint()), views=2,
          chunk_rows=8, **AUGMENT)
    verify = ["verify", str(tmp_path / "u.zarr"), "--sample", "24", "--threads", "1",
              "--device", "cpu"]
    assert cli_main(verify) == 0, capsys.readouterr().out
    shutil.copytree(tmp_path / "pool", tmp_path / "copy")  # copy2: sizes and times kept
    assert cli_main([*verify, "--root", str(tmp_path / "copy")]) == 0
    capsys.readouterr()
    shard = tmp_path / "pool" / "imagenet22k-train-0002.tar"
    shard.write_bytes(shard.read_bytes())  # another modification time
    assert cli_main(verify) == 1
    out = capsys.readouterr().out
    assert "imagenet22k-train-0002.tar/" in out and "cannot be decoded now" in out


def test_dedup_confirms_duplicates_read_from_shards(world, make_checkpoint, tmp_path, capsys):
    """The query set (the unpacked images, a class folder) against the pool on shards: every
    query's copy is found and confirmed by SIFT on the pool images read from the shards;
    the same lines as against the pool's files (same keys)."""
    checkpoint = str(make_checkpoint())
    options = dict(checkpoint=checkpoint, embeddings=True, chunk_rows=8)
    infer(world["unpacked"], tmp_path / "query.zarr", **options)
    infer(world["pool"], tmp_path / "pool.zarr", **options)
    infer(world["twin_pool"], tmp_path / "twin.zarr", **options)
    outputs = []
    for pool in ("pool.zarr", "twin.zarr"):
        out = tmp_path / f"{pool}.txt"
        assert cli_main(["dedup", "--query", str(tmp_path / "query.zarr"), "--pool",
                         str(tmp_path / pool), "--out", str(out), "--threshold", "0.99",
                         "--threads", "1", "--device", "cpu"]) == 0
        outputs.append([line for line in out.read_text().splitlines()
                        if not line.startswith("#")])
    capsys.readouterr()
    assert outputs[0] == outputs[1]
    pairs = {line.split("\t")[1]: line.split("\t")[0] for line in outputs[0]}
    assert pairs == {f"{WNIDS[s['label']]}/{s['key']}.jpg": f"{s['shard']}/{s['key']}"
                     for s in world["samples"]}
    assert all(int(line.split("\t")[3]) >= 20 for line in outputs[0])


def test_a_pool_whose_cls_are_another_class_space(world, make_checkpoint, tmp_path, capsys):
    """ImageNet-22k's cls are ids of 21,841 classes, not the teacher's: refused naming the
    first such row, unless --source unlabeled (every label -1, the keys and images kept)."""
    checkpoint = make_checkpoint(num_classes=2)
    args = _cli_args(world["pool"], tmp_path / "u.zarr", checkpoint, topk=2)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "label 2 of imagenet22k-train-0000.tar/n01484850_" in err
    assert "is >= the model's 2 classes" in err
    assert cli_main([*args, "--source", "unlabeled"]) == 0
    store = labelstore.open(str(tmp_path / "u.zarr"))
    assert (store.labels == -1).all() and store.attrs["dataset"]["source"] == "shards"
    assert store.keys.tolist() == [f"{s['shard']}/{s['key']}" for s in world["samples"]]


def test_views_from_a_store_of_shard_data_replays_its_rows_from_the_shards(world,
                                                                          make_checkpoint,
                                                                          tmp_path):
    """``--views-from`` a store of shard data (no --data): its rows, crops and records —
    mixing partners included — are read back from the shards by the recorded offsets; the
    same teacher gives the same store, shard locations included."""
    options = dict(checkpoint=str(make_checkpoint()), decoder="pil", chunk_rows=6)
    infer(world["pool"], tmp_path / "u.zarr", views=3, **options, **AUGMENT)
    infer(None, tmp_path / "again.zarr", views_from=str(tmp_path / "u.zarr"), **options)
    same_arrays(tmp_path / "u.zarr", tmp_path / "again.zarr", skip=())
    assert labelstore.open(str(tmp_path / "again.zarr")).valid.all()


def test_size_only_comparison_reads_shards_copied_without_their_times(world, tmp_path):
    """``ImageSource(stamps=False)`` compares a shard's size only: a copy that lost its
    modification time is read (and its rows checked by their tar headers), where the
    default refuses it."""
    shutil.copytree(world["pool"], tmp_path / "pool")
    found = shards.find_shard_samples(str(tmp_path / "pool"))
    shard = tmp_path / "pool" / "imagenet22k-train-0000.tar"
    shard.write_bytes(shard.read_bytes())  # the same bytes, a new modification time
    strict, sizes = ImageSource(found.root), ImageSource(found.root, stamps=False)
    with pytest.raises(shards.ShardReadError, match="changed since it was indexed"):
        strict.read(found.keys[0], found.tar[0])
    assert sizes.read(found.keys[0], found.tar[0]) == world["samples"][0]["data"]
    assert strict.problems(found.keys, found.tar)[0] == PER_SHARD
    assert sizes.problems(found.keys, found.tar) == (0, [])
    data = [entry for entry in sizes.read_many(found.keys, found.tar)]
    assert [d for d, _ in data] == [s["data"] for s in world["samples"]]
    member = f"{world['samples'][1]['key']}.jpg"  # renamed in place: the header still tells
    _rename_member(shard, member, member.replace("_1", "_9"))
    with pytest.raises(shards.ShardReadError, match="not n01.*_10027's image"):
        sizes.read(found.keys[1], found.tar[1])


def test_a_resume_over_shards_that_changed_is_refused(world, make_checkpoint, tmp_path, capsys):
    """The store records the shards it was listed from (their fingerprint): resuming after a
    shard changed would mix rows of two versions of the data, and is refused naming it."""
    shutil.copytree(world["pool"], tmp_path / "pool")
    out = tmp_path / "u.zarr"
    args = _cli_args(tmp_path / "pool", out, make_checkpoint(), chunk_rows=8)
    assert cli_main(args) == 0
    zarr.open_group(str(out), mode="r+")["done"][2] = False  # as after a crash
    shard = tmp_path / "pool" / "imagenet22k-train-0001.tar"
    shard.write_bytes(shard.read_bytes())  # the same bytes, a new modification time
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "was written with different settings: dataset.shards_fingerprint" in err
    assert labelstore.open(str(out)).attrs["dataset"]["shards"] == SHARDS
