"""teacher_infer.shards: WebDataset tar shards as a data source.

References are independent of the code under test: ``tarfile`` (member offsets and sizes),
webdataset's own reader (keys and samples), DALI's ``wds2idx.py`` (index files), and the
bytes written into the shards. Shards are tiny real JPEGs and PNGs laid out like timm's
ImageNet-22k shards (``.jpg`` + ``.cls``, keys like ``n01440764_10026``, an ``_info.json``).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import smooth_rgb
from teacher_infer import ImageSource
from teacher_infer import shards as sh
from teacher_infer.shards import ShardReadError

try:  # the suite's moto S3 server (skipped there, and here, without moto and s3fs)
    from test_labelstore_s3 import bucket, s3_env  # noqa: F401
except pytest.skip.Exception:  # pragma: no cover
    pass

WNIDS = ["n01440764", "n01443537", "n01484850"]


def encode(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (20, 14)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(smooth_rgb(size[1], size[0], seed)).save(out, format=fmt)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], *,
              fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A tar file of ``members`` in order (tarfile writes it: the reference layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def imagenet_members(shard: int, count: int) -> list[tuple[str, bytes]]:
    """timm's IN-22k layout: KEY.cls then KEY.jpg per sample, classes mixed."""
    members = []
    for i in range(count):
        label = (shard * count + i) % len(WNIDS)
        key = f"{WNIDS[label]}_{10026 + shard * 100 + i}"
        members += [(f"{key}.cls", f"{label}\n".encode()),
                    (f"{key}.jpg", encode(shard * 100 + i))]
    return members


def make_shards(folder: Path, shards: int = 3, per_shard: int = 4, *, info: bool = True,
                prefix: str = "imagenet22k-train") -> list[Path]:
    paths = [write_tar(folder / f"{prefix}-{s:04d}.tar", imagenet_members(s, per_shard))
             for s in range(shards)]
    if info:
        (folder / "_info.json").write_text(json.dumps({"name": "in22k", "splits": {"train": {
            "name": "train", "num_samples": shards * per_shard,
            "filenames": [p.name for p in paths], "shard_lengths": [per_shard] * shards}}}))
    return paths


def reference(paths: list[Path]) -> list[dict]:
    """Per image, from tarfile: store key, label, data offset and size, bytes."""
    rows = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".jpg"):
                    key = name[:-4]
                    cls = tar.extractfile(members[key + ".cls"]).read()
                    rows.append({"key": f"{path.name}/{key}", "label": int(cls),
                                 "offset": member.offset_data, "size": member.size,
                                 "data": tar.extractfile(member).read()})
    return rows


@pytest.fixture
def in22k(tmp_path) -> Path:
    make_shards(tmp_path / "in22k")
    return tmp_path / "in22k"


# -- resolving a source --------------------------------------------------------------
def test_every_spec_kind_names_the_same_shards(in22k, tmp_path):
    names = [f"imagenet22k-train-{s:04d}.tar" for s in range(3)]
    specs = {"pattern": f"{in22k}/imagenet22k-train-{{0000..0002}}.tar",
             "glob": f"{in22k}/imagenet22k-*.tar",
             "folder": str(in22k),
             "timm": f"{in22k}/_info.json#train"}
    for kind, spec in specs.items():
        found = sh.resolve_shards(spec)
        assert found.root == str(in22k), kind
        assert [s.name for s in found.shards] == names, kind
        assert [s.size for s in found.shards] == [os.path.getsize(in22k / n) for n in names]
        assert [s.stamp for s in found.shards] == [os.stat(in22k / n).st_mtime_ns
                                                    for n in names]
    assert sh.resolve_shards(specs["pattern"]).kind == "pattern"
    assert sh.resolve_shards(specs["folder"]).kind == "folder"
    # the _info.json beside the shards gives the counts, in a folder spec too
    assert [s.expected for s in sh.resolve_shards(specs["timm"]).shards] == [4, 4, 4]
    assert [s.expected for s in sh.resolve_shards(specs["folder"]).shards] == [4, 4, 4]
    one = sh.resolve_shards(str(in22k / names[1]))
    assert (one.kind, one.root, [s.name for s in one.shards]) == ("file", str(in22k), names[1:2])


def test_several_patterns_share_the_deepest_common_root(tmp_path):
    make_shards(tmp_path / "a", 2, info=False)
    write_tar(tmp_path / "b" / "other-0000.tar", imagenet_members(7, 4))
    found = sh.resolve_shards(f"{tmp_path}/a/imagenet22k-train-{{0000..0001}}.tar::"
                              f"{tmp_path}/b/*.tar")
    assert found.root == str(tmp_path)
    assert [s.name for s in found.shards] == ["a/imagenet22k-train-0000.tar",
                                              "a/imagenet22k-train-0001.tar",
                                              "b/other-0000.tar"]
    keys = sh.list_samples(found).keys
    assert keys[0] == "a/imagenet22k-train-0000.tar/n01440764_10026"
    assert sh.split_key(keys[-1]) == ("b/other-0000.tar", "n01443537_10729")


def test_wids_index_is_read_and_its_sizes_checked(in22k):
    entries = [{"url": f"imagenet22k-train-{s:04d}.tar", "nsamples": 4,
                "filesize": os.path.getsize(in22k / f"imagenet22k-train-{s:04d}.tar")}
               for s in range(3)]
    index = in22k / "shards.json"
    index.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                 "shardlist": entries}))
    found = sh.resolve_shards(str(index))
    assert found.kind == "wids" and found.root == str(in22k)
    assert [s.expected for s in found.shards] == [4, 4, 4]
    assert len(sh.list_samples(found)) == 12
    entries[1]["filesize"] += 1
    index.write_text(json.dumps({"wids_version": 1, "shardlist": entries}))
    with pytest.raises(ValueError, match=r"imagenet22k-train-0001.tar has [\d,]+ bytes, .* says"):
        sh.resolve_shards(str(index))
    entries[1]["filesize"] -= 1
    entries[2]["nsamples"] = 5
    index.write_text(json.dumps({"wids_version": 1, "shardlist": entries}))
    with pytest.raises(ValueError, match="shard imagenet22k-train-0002.tar has 4 samples, its "
                                         "index file says 5"):
        sh.list_samples(sh.resolve_shards(str(index)))


def test_timm_info_splits(in22k, tmp_path):
    make_shards(tmp_path / "val", 1, info=False, prefix="imagenet22k-validation")
    shutil.copy(tmp_path / "val" / "imagenet22k-validation-0000.tar", in22k)
    info = json.loads((in22k / "_info.json").read_text())
    info["splits"]["validation"] = {"name": "validation", "num_samples": 4,
                                    "filenames": ["imagenet22k-validation-0000.tar"],
                                    "shard_lengths": [4]}
    (in22k / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"has the splits train, validation: name one as "
                                         r".*_info.json#SPLIT"):
        sh.resolve_shards(str(in22k / "_info.json"))
    with pytest.raises(ValueError, match="holds the splits train, validation of its "
                                         "_info.json: give .*_info.json#SPLIT or a pattern"):
        sh.resolve_shards(str(in22k))  # a folder must not mix train and validation
    assert [s.name for s in sh.resolve_shards(f"{in22k}/_info.json#validation").shards] == \
        ["imagenet22k-validation-0000.tar"]
    with pytest.raises(ValueError, match="has no split 'test'"):
        sh.resolve_shards(f"{in22k}/_info.json#test")
    info["splits"]["train"]["num_samples"] = 13
    (in22k / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="says num_samples 13, its shard_lengths add up to 12"):
        sh.resolve_shards(f"{in22k}/_info.json#train")


def test_sources_that_name_no_usable_shard_are_one_line(in22k, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data .*: shard .*imagenet22k-train-0003.tar "
                                                r"does not exist \(1 of 4 shards missing\)"):
        sh.resolve_shards(f"{in22k}/imagenet22k-train-{{0000..0003}}.tar")
    with pytest.raises(ValueError, match=r"--val .*\*-nothing-\*.tar matches no .tar file"):
        sh.resolve_shards(f"{in22k}/*-nothing-*.tar", option="--val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sh.resolve_shards(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards in this folder"):
        sh.resolve_shards(str(tmp_path / "empty"))
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "a-0000.tar.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="a-0000.tar.gz and others are compressed"):
        sh.resolve_shards(str(tmp_path / "packed"))
    with pytest.raises(ValueError, match="is compressed; samples are read by byte range"):
        sh.resolve_shards(str(tmp_path / "packed" / "a-{0000..0000}.tar.gz"))
    with pytest.raises(ValueError, match="is named twice"):
        sh.resolve_shards(f"{in22k}/imagenet22k-train-{{0000,0000}}.tar")
    shutil.copytree(in22k, tmp_path / "odd.tar")  # keys could not find their shard
    with pytest.raises(ValueError, match="has a part ending in .tar"):
        sh.resolve_shards(str(tmp_path / "odd.tar"))


def test_is_shard_source(in22k, image_folder):
    assert sh.is_shard_source(str(in22k))
    assert sh.is_shard_source(f"{in22k}/x-{{0..3}}.tar")
    assert sh.is_shard_source(f"{in22k}/_info.json#train")
    assert sh.is_shard_source("s3://bucket/in22k")
    assert not sh.is_shard_source(str(image_folder.data))


# -- listing: keys, labels, offsets --------------------------------------------------
def test_listing_matches_tarfile(in22k):
    paths = sorted(in22k.glob("*.tar"))
    samples = sh.list_samples(sh.resolve_shards(str(in22k)))
    expected = reference(paths)
    assert samples.keys == [row["key"] for row in expected]
    assert samples.labels.tolist() == [row["label"] for row in expected]
    np.testing.assert_array_equal(samples.tar[:, 0], [row["offset"] for row in expected])
    np.testing.assert_array_equal(samples.tar[:, 1], [row["size"] for row in expected])
    np.testing.assert_array_equal(samples.tar[:, 2], np.repeat(
        [os.path.getsize(p) for p in paths], 4))
    assert samples.source == "shards" and samples.root == str(in22k)
    assert samples.bounds.tolist() == [0, 4, 8, 12]
    assert samples.shard_of(5).name == "imagenet22k-train-0001.tar"
    assert sh.TAR_FIELDS == ("offset", "size", "shard_size", "shard_stamp")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_and_non_ascii_names_in_every_tar_format(tmp_path, fmt):
    """ustar keeps long names in its prefix field, GNU in a long-name record, pax in an
    extended header: the listing finds the names and the data offsets tarfile finds."""
    deep = "/".join(["folder"] * 12)                   # > 100 characters with the name
    keys = [f"{deep}/n01440764_1", "n01440764_2", f"{'x' * 120}_3"]
    if fmt != tarfile.USTAR_FORMAT:
        keys.append("caf\u00e9/\u00e9t\u00e9_4")       # non-ASCII: no ustar header holds it
    if fmt == tarfile.USTAR_FORMAT:
        keys[2] = f"{'d' * 90}/{'y' * 90}_3"         # ustar: name <= 100 after the prefix
    members = [(f"{key}.jpg", encode(i)) for i, key in enumerate(keys)]
    path = write_tar(tmp_path / "names.tar", members, fmt=fmt)
    samples = sh.list_samples(sh.resolve_shards(str(path)))
    assert samples.keys == [f"names.tar/{key}" for key in keys]
    with tarfile.open(path) as tar:
        offsets = [tar.getmember(f"{key}.jpg").offset_data for key in keys]
    assert samples.tar[:, 0].tolist() == offsets
    reader = samples.reader()
    assert [reader.read(k, t) for k, t in zip(samples.keys, samples.tar)] == \
        [data for _, data in members]


def test_webdataset_key_convention(tmp_path):
    """Keys and images as webdataset's own reader groups the same members."""
    wds = pytest.importorskip("webdataset")
    members = [("__index__", b"{}"), ("__meta__/x.json", b"{}"),   # metadata: skipped
               ("a.jpg", encode(0)), ("a.cls", b"1"),
               ("b.seg.png", encode(1, "PNG")), ("b.JPG", encode(2)),   # ext 'seg.png', 'jpg'
               ("dir.v2/c.png", encode(3, "PNG")), ("dir.v2/c.webp", encode(4, "WEBP")),
               ("d.jpeg", encode(5)), ("d.png", encode(6, "PNG")),      # jpeg before png
               (".hidden.jpg", encode(7)),           # hidden: no key
               ("noextension", b"x"),                # no extension: no key
               ("sub/e.x.jpg", encode(8)), ("sub/e.jpg", encode(9))]  # ext 'x.jpg', 'jpg'
    path = write_tar(tmp_path / "edge.tar", members)
    samples = sh.list_samples(sh.resolve_shards(str(path)))
    listing = sh.list_shard(sh.resolve_shards(str(path)).shards[0])
    assert listing.skipped == 4
    found = {key.split("/", 1)[1]: samples.reader().read(key, tar)
             for key, tar in zip(samples.keys, samples.tar)}
    expected = {}
    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        image = next(sample[ext] for ext in sh.IMAGE_EXTENSIONS if ext in sample)
        expected[sample["__key__"]] = image
    assert list(found) == list(expected) == ["a", "b", "dir.v2/c", "d", "sub/e"]
    assert found == expected
    assert found["b"] == encode(2) and found["dir.v2/c"] == encode(3, "PNG")
    assert found["d"] == encode(5) and found["sub/e"] == encode(9)
    assert samples.labels.tolist() == [1, -1, -1, -1, -1]
    assert sh.split_name("x/y.z.JPG") == ("x/y", "z.jpg")
    assert sh.split_name("__key__/x.jpg") is None and sh.split_name(".x.jpg") is None


# -- reading by byte range -----------------------------------------------------------
def test_reads_return_exactly_each_member(in22k):
    samples = sh.find_shard_samples(str(in22k))
    expected = [row["data"] for row in reference(sorted(in22k.glob("*.tar")))]
    reader = samples.reader()
    assert [reader.read(k, t) for k, t in zip(samples.keys, samples.tar)] == expected
    order = np.random.default_rng(0).permutation(len(samples))
    for runs in (False, True):
        many = samples.reader(runs=runs, block_bytes=3000).read_many(
            [samples.keys[i] for i in order], samples.tar[order])
        assert [(i, data, error) for i, data, error in many] == \
            [(n, expected[i], None) for n, i in enumerate(order)]
        sequential = list(samples.reader(runs=runs, block_bytes=3000).read_many(
            samples.keys, samples.tar))
        assert [data for _, data, _ in sequential] == expected
    with pytest.raises(ValueError, match="has no shard location"):
        reader.read(samples.keys[0], [-1, -1, -1, -1])  # a folder store's row


def test_reader_pickles_without_open_files(in22k):
    import pickle

    samples = sh.find_shard_samples(str(in22k))
    reader = samples.reader()
    first = reader.read(samples.keys[0], samples.tar[0])
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._files == {} and copy.read(samples.keys[0], samples.tar[0]) == first
    error = pickle.loads(pickle.dumps(ShardReadError("shard x changed", lasting=False)))
    assert isinstance(error, ShardReadError) and str(error) == "shard x changed"
    assert not error.lasting


def test_a_passing_storage_error_is_tried_again(in22k, monkeypatch):
    """A shard that could not be opened (a network error) fails that row only; a shard
    that changed fails every later row without being opened again."""
    from teacher_infer.shards import _storage

    samples = sh.find_shard_samples(str(in22k))
    expected = reader_bytes(samples, 1)
    real, calls = _storage.RangeFile.info, []

    def flaky(self):
        calls.append(self.path)
        if len(calls) == 1:
            raise OSError("connection reset")
        return real(self)

    monkeypatch.setattr(_storage.RangeFile, "info", flaky)
    reader = samples.reader()
    with pytest.raises(ShardReadError, match="cannot be opened: connection reset"):
        reader.read(samples.keys[0], samples.tar[0])
    assert reader.read(samples.keys[1], samples.tar[1]) == expected
    changed = samples.tar[4].copy()
    changed[2] += 1  # rows that say the shard had another size
    for _ in range(2):
        with pytest.raises(ShardReadError, match="changed since it was indexed"):
            reader.read(samples.keys[4], changed)
    assert len(calls) == 3  # shard 0 twice (failed, then opened), shard 1 once (kept error)


# -- damage ----------------------------------------------------------------------------
def test_listing_time_damage_is_one_line_naming_the_shard(tmp_path):
    good = imagenet_members(0, 3)
    cases = {
        "no image": (good + [("n01_9.cls", b"1"), ("n01_9.txt", b"x")],
                     r"sample 'n01_9' has no image \(members: cls, txt"),
        "cls": (good + [("n01_9.jpg", encode(9)), ("n01_9.cls", b"cat")],
                r"sample 'n01_9': cls 'cat' is not an integer"),
        "negative cls": (good + [("n01_9.jpg", encode(9)), ("n01_9.cls", b"-4")],
                         r"cls -4 must be >= 0"),
        "key again": (good + [("n01_9.jpg", encode(9)), (good[0][0].replace(".cls", ".png"),
                                                        encode(1, "PNG"))],
                      r"__key__ 'n01440764_10026' appears again .* after other keys"),
        "ext twice": ([("a.jpg", encode(0)), ("a.JPG", encode(1))], r"sample 'a' has two 'jpg'"),
        "empty": ([("__meta__", b"x")], "has no samples"),
        "bad key": ([("a\tb.jpg", encode(0))], r"__key__ 'a\\tb' contains a tab"),
    }
    for name, (members, message) in cases.items():
        path = write_tar(tmp_path / name / "s-0000.tar", members)
        with pytest.raises(ValueError, match=f"shard s-0000.tar: .*{message}|"
                                             f"shard s-0000.tar {message}"):
            sh.list_samples(sh.resolve_shards(str(path.parent)))


def test_key_in_two_shards_is_refused(tmp_path):
    write_tar(tmp_path / "s-0000.tar", imagenet_members(0, 2))
    write_tar(tmp_path / "s-0001.tar", imagenet_members(0, 1))
    with pytest.raises(ValueError, match="__key__ 'n01440764_10026' is in shard s-0000.tar and "
                                         "in shard s-0001.tar"):
        sh.list_samples(sh.resolve_shards(str(tmp_path)))


def test_truncated_and_damaged_tars(in22k):
    path = in22k / "imagenet22k-train-0001.tar"
    whole = path.read_bytes()
    offsets = [row["offset"] for row in reference([path])]
    cuts = {offsets[1] + 100: "member at byte .* needs",          # inside an image
            offsets[1] - 300: "ends at byte .* inside a tar header",
            offsets[-1] + (reference([path])[-1]["size"] + 511) // 512 * 512:
                "without the tar end-of-archive block"}              # at a member boundary
    for cut, message in cuts.items():
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=f"shard imagenet22k-train-0001.tar is truncated: "
                                             f"(.*{message})"):
            sh.list_samples(sh.resolve_shards(str(in22k)))
    damaged = bytearray(whole)
    damaged[offsets[2] - 512 + 130] ^= 0x01                         # a size digit
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"tar header at byte [\d,]+ is damaged \(bad checksum\)"):
        sh.list_samples(sh.resolve_shards(str(in22k)))


def test_changed_shard_fails_its_rows_never_another_image(in22k):
    """After indexing, a shard rewritten (its mtime, its size, or the member at an indexed
    offset): its rows raise ShardReadError (an OSError: the teacher pass's failed row),
    the other rows read as before, and no row returns another image's bytes."""
    samples = sh.find_shard_samples(str(in22k))
    expected = [row["data"] for row in reference(sorted(in22k.glob("*.tar")))]
    path = in22k / "imagenet22k-train-0001.tar"
    before = os.stat(path)
    assert issubclass(ShardReadError, OSError)

    # the same bytes with a new mtime: refused before reading
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
    with pytest.raises(ShardReadError, match="shard imagenet22k-train-0001.tar changed since "
                                             r"it was indexed \(modification time\)"):
        samples.reader().read(samples.keys[4], samples.tar[4])

    # row 5's image renamed (same length in the archive), the mtime put back: the stamp
    # cannot tell, the header in front of the bytes does
    members = imagenet_members(1, 4)
    members[3] = ("zz" + members[3][0], members[3][1])
    write_tar(path, members)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(path) == before.st_size
    sample = sh.split_key(samples.keys[5])[1]
    with pytest.raises(ShardReadError, match=f"imagenet22k-train-0001.tar: {sample}: the member "
                                             f"at the indexed bytes is 'zz{sample}.jpg'"):
        samples.reader().read(samples.keys[5], samples.tar[5])
    for runs in (False, True):
        results = list(samples.reader(runs=runs).read_many(samples.keys, samples.tar))
        assert [error is None for _, _, error in results] == [i != 5 for i in range(12)]
        assert [data for _, data, _ in results if data is not None] == \
            [data for i, data in enumerate(expected) if i != 5]

    # cut short: the size differs; a missing shard fails its rows; the others still read
    path.write_bytes(path.read_bytes()[:1000])
    reader = samples.reader()
    with pytest.raises(ShardReadError, match=r"changed since it was indexed \(size"):
        reader.read(samples.keys[6], samples.tar[6])
    os.remove(in22k / "imagenet22k-train-0002.tar")
    with pytest.raises(ShardReadError, match="shard imagenet22k-train-0002.tar is missing"):
        reader.read(samples.keys[9], samples.tar[9])
    assert reader.read(samples.keys[0], samples.tar[0]) == expected[0]


# -- DALI index files -------------------------------------------------------------------
def test_dali_index_is_used_and_checked(in22k):
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own tool writes the .idx files
    paths = sorted(in22k.glob("*.tar"))
    for path in paths:
        with wds2idx.IndexCreator(str(path), str(path.with_suffix(".idx")), verbose=False) as ic:
            ic.create_index()
    found = sh.resolve_shards(str(in22k))
    assert [s.dali_index for s in found.shards] == [str(p.with_suffix(".idx")) for p in paths]
    via_idx = sh.list_samples(found)
    scanned = sh.list_samples(found, use_dali_index=False)
    assert via_idx.keys == scanned.keys
    np.testing.assert_array_equal(via_idx.tar, scanned.tar)
    np.testing.assert_array_equal(via_idx.labels, scanned.labels)
    assert {sh.list_shard(s).via for s in found.shards} == {"dali-idx"}
    # an index made for another shard is refused by name
    shutil.copy(paths[0].with_suffix(".idx"), paths[1].with_suffix(".idx"))
    with pytest.raises(ValueError, match=r"imagenet22k-train-0001.idx does not describe shard "
                                         r"imagenet22k-train-0001.tar .*: the header before"):
        sh.list_samples(sh.resolve_shards(str(in22k)))
    paths[1].with_suffix(".idx").write_text("v1.2 2\ncls 512 2 a.cls\n")
    with pytest.raises(ValueError, match="says 2 samples, the file lists 1"):
        sh.list_samples(sh.resolve_shards(str(in22k)))


# -- the index: built once, resumable, checked on load --------------------------------------
def test_index_is_resumable_and_equals_listing(in22k, tmp_path):
    out = tmp_path / "index"
    listed = sh.find_shard_samples(str(in22k))
    result = sh.build_index(str(in22k), str(out))
    assert (result.shards, result.samples, result.listed, result.reused) == (3, 12, 3, 0)
    assert "12 samples in 3 shards" in str(result)
    for spec in (out, out / sh.INDEX_MANIFEST):
        loaded = sh.find_shard_samples(str(spec))
        assert loaded.keys == listed.keys and loaded.root == listed.root
        np.testing.assert_array_equal(loaded.tar, listed.tar)
        np.testing.assert_array_equal(loaded.labels, listed.labels)

    # a damaged shard: the others' parts are kept; once fixed, only it is listed again
    path = in22k / "imagenet22k-train-0002.tar"
    whole = path.read_bytes()
    path.write_bytes(whole[:reference([path])[-1]["offset"] + 10])
    shutil.rmtree(out)
    with pytest.raises(ValueError, match="shard imagenet22k-train-0002.tar is truncated"):
        sh.build_index(str(in22k), str(out))
    assert sorted(p.name for p in (out / "parts").iterdir()) == \
        ["imagenet22k-train-0000.tar.npz", "imagenet22k-train-0001.tar.npz"]
    with pytest.raises(ValueError, match="the index is incomplete"):
        sh.load_index(str(out))
    path.write_bytes(whole)
    again = sh.build_index(str(in22k), str(out))
    assert (again.listed, again.reused) == (1, 2)
    assert sh.load_index(str(out)).keys == listed.keys

    # a shard that changed since: refused on load, listed again by the next build
    os.utime(in22k / "imagenet22k-train-0000.tar", ns=(0, 10**18))
    with pytest.raises(ValueError, match="shard imagenet22k-train-0000.tar changed since it "
                                         "was indexed"):
        sh.load_index(str(out))
    assert sh.build_index(str(in22k), str(out)).listed == 1
    assert sh.load_index(str(out)).tar[0, 3] == 10**18

    # --out that is something else is refused, untouched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not an ssld shard index"):
        sh.build_index(str(in22k), str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


# -- object storage (moto) ----------------------------------------------------------------
@pytest.fixture
def s3_shards(in22k, request):
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    bucket = request.getfixturevalue("bucket")  # noqa: F811 - test_labelstore_s3's fixture
    import fsspec

    fs, _ = fsspec.core.url_to_fs(bucket)
    for path in sorted(in22k.iterdir()):
        fs.put_file(str(path), f"{bucket[5:]}/in22k/{path.name}")
    return f"{bucket}/in22k"


def test_s3_source_reads_what_local_disk_reads(in22k, s3_shards, tmp_path, monkeypatch):
    local = sh.find_shard_samples(str(in22k))
    for spec in (s3_shards, f"{s3_shards}/imagenet22k-train-{{0000..0002}}.tar",
                 f"{s3_shards}/_info.json#train", f"{s3_shards}/*.tar"):
        remote = sh.find_shard_samples(spec)
        assert remote.root == s3_shards
        assert remote.keys == local.keys
        np.testing.assert_array_equal(remote.tar[:, :3], local.tar[:, :3])
        assert remote.tar[0, 3] != local.tar[0, 3]  # an ETag digest, not an mtime
    expected = [row["data"] for row in reference(sorted(in22k.glob("*.tar")))]
    # consecutive rows: one ranged GET per shard (and one HEAD for its size and ETag);
    # row by row: a GET per row
    from test_labelstore_s3 import Counter

    counter = Counter(monkeypatch)
    reader = remote.reader()
    assert [data for _, data, _ in reader.read_many(remote.keys, remote.tar)] == expected
    assert sorted(counter.take()) == ["get_object"] * 3 + ["head_object"] * 3
    rows = remote.reader(runs=False).read_many(remote.keys, remote.tar)
    assert [data for _, data, _ in rows] == expected
    assert counter.take().count("get_object") == 12
    assert reader.read(remote.keys[5], remote.tar[5]) == expected[5]

    sh.build_index(s3_shards, f"{s3_shards}-index")
    loaded = sh.load_index(f"{s3_shards}-index")
    assert loaded.keys == remote.keys
    np.testing.assert_array_equal(loaded.tar, remote.tar)

    # the object replaced (new ETag): its rows fail, the index refuses to load
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3_shards)
    fs.put_file(str(in22k / "imagenet22k-train-0000.tar"),
                f"{s3_shards[5:]}/imagenet22k-train-0001.tar")
    fs.invalidate_cache()
    with pytest.raises(ShardReadError, match=r"imagenet22k-train-0001.tar changed since it was "
                                             r"indexed \((size .*, )?ETag\)"):
        remote.reader().read(remote.keys[4], remote.tar[4])
    with pytest.raises(ValueError, match="imagenet22k-train-0001.tar changed since it was "
                                         "indexed"):
        sh.load_index(f"{s3_shards}-index")


# -- the store's per-row shard index (labelstore SCHEMA) --------------------------------
def _shard_store(path, samples, *, seed: int, **options):
    """A store of ``samples`` (ShardSamples) with random teacher rows and its tar array."""
    import labelstore
    from test_select import pool_rows

    data = pool_rows(len(samples), views=1, k=2, classes=3, seed=seed)
    with labelstore.create(path, keys=samples.keys, num_classes=3, topk=2,
                           labels=samples.labels, chunk_rows=4,
                           tar_fields=labelstore.TAR_FIELDS, **options,
                           attrs={"dataset": {"root": samples.root, "source": "shards"}}) as w:
        w.write(0, data["indices"], data["probs"], valid=data["valid"], tar=samples.tar)
    return str(path)


def test_store_tar_array_is_carried_bit_exactly(tmp_path):
    """The ``tar`` SCHEMA entry of stores created with ``tar_fields``: created (the
    attribute), written with the rows (required with every write), opened, read back
    (``read_tar``, from RAM after ``load``), selected, merged (keys prefixed below the
    common root) and exported as it was stored — and a merged store's rows still read their
    images."""
    import h5py
    import zarr

    import labelstore
    from labelstore._export import export_hdf5
    from test_select import pool_rows

    roots, stores, found = [tmp_path / "u" / "a", tmp_path / "u" / "b"], [], []
    for number, root in enumerate(roots):
        make_shards(root, 2, 5, info=False, prefix=f"pool{number}")
        samples = sh.find_shard_samples(str(root))
        stores.append(_shard_store(tmp_path / f"s{number}.zarr", samples, seed=number))
        found.append(samples)
        store = labelstore.open(stores[-1])
        assert store.attrs["tar_fields"] == list(labelstore.TAR_FIELDS) == list(store.tar_fields)
        np.testing.assert_array_equal(store.read_tar(slice(None)), samples.tar)
        np.testing.assert_array_equal(store.load().read_tar([7, 2]), samples.tar[[7, 2]])
        array = zarr.open_group(stores[-1], mode="r")["tar"]
        assert (array.dtype, array.chunks, array.fill_value) == (np.int64, (4, 4), -1)
        assert tuple(array.metadata.dimension_names) == ("row", "tar_field")
    data = pool_rows(3, views=1, k=2, classes=3, seed=0)
    with labelstore.create(tmp_path / "w.zarr", keys=["a.tar/x", "a.tar/y", "a.tar/z"],
                           num_classes=3, topk=2, tar_fields=labelstore.TAR_FIELDS) as w:
        with pytest.raises(ValueError, match=r"this store has tar: pass tar=\(n, 4\)"):
            w.write(0, data["indices"], data["probs"])
    with pytest.raises(ValueError, match="tar_fields must be"):
        labelstore.create(tmp_path / "bad.zarr", keys=["a"], num_classes=3, topk=2,
                          tar_fields=("offset", "size"))
    with labelstore.create(tmp_path / "files.zarr", keys=["a", "b", "c"], num_classes=3,
                           topk=2) as w:
        with pytest.raises(ValueError, match=r"created without tar \(tar_fields\)"):
            w.write(0, data["indices"], data["probs"], tar=np.zeros((3, 4), np.int64))
    files = labelstore.open(tmp_path / "files.zarr")
    assert files.tar_fields is None and (files.read_tar([0, 2]) == -1).all()

    def stored(path):
        return np.asarray(zarr.open_group(str(path), mode="r")["tar"][:])

    result = labelstore.select_topk(stores[0], 2, tmp_path / "sel.zarr")
    chosen = np.unique(result.selection.rows)
    np.testing.assert_array_equal(stored(tmp_path / "sel.zarr"), found[0].tar[chosen])

    labelstore.merge([tmp_path / "sel.zarr", stores[1]], tmp_path / "merged.zarr")
    merged = labelstore.open(tmp_path / "merged.zarr")
    tar = stored(tmp_path / "merged.zarr")
    np.testing.assert_array_equal(tar, np.concatenate([found[0].tar[chosen], found[1].tar]))
    root = merged.attrs["dataset"]["root"]
    assert root == str(tmp_path / "u") and merged.keys[0].startswith("a/pool0-")
    reader = sh.ShardReader(root)
    expected = ([reader_bytes(found[0], i) for i in chosen]
                + [reader_bytes(found[1], i) for i in range(len(found[1]))])
    assert [reader.read(key, row) for key, row in zip(merged.keys, tar)] == expected

    export_hdf5(labelstore.open(stores[1]), str(tmp_path / "s1.h5"), slice(2, 9))
    with h5py.File(tmp_path / "s1.h5", "r") as h5:
        np.testing.assert_array_equal(h5["tar"][:], found[1].tar[2:9])
    xr = pytest.importorskip("xarray")
    assert xr.open_zarr(stores[1], consolidated=False)["tar"].dims == ("row", "tar_field")


def test_a_folder_store_merged_with_a_shard_store(tmp_path, image_folder):
    """SSLD's training set: L from image files, U from shards. The output has ``tar``: the
    folder store's rows hold -1 (image files), whichever store comes first; ensemble keeps
    its first member's; inspect counts the rows in shards."""
    import labelstore
    from test_select import pool_rows

    make_shards(tmp_path / "pool", 2, 5, info=False)
    pool = _shard_store(tmp_path / "u.zarr", sh.find_shard_samples(str(tmp_path / "pool")),
                        seed=1)
    data = pool_rows(len(image_folder), views=1, k=2, classes=3, seed=2)
    with labelstore.create(tmp_path / "l.zarr", keys=image_folder.keys, num_classes=3, topk=2,
                           labels=image_folder.labels, chunk_rows=4,
                           attrs={"dataset": {"root": str(image_folder.root)}}) as w:
        w.write(0, data["indices"], data["probs"])
    shard_tar = labelstore.open(pool).read_tar(slice(None))
    listed = sh.find_shard_samples(str(tmp_path / "pool"))
    reference = {key: reader_bytes(listed, row) for row, key in enumerate(listed.keys)}
    for number, order in enumerate(([tmp_path / "l.zarr", pool], [pool, tmp_path / "l.zarr"])):
        out = tmp_path / f"m{number}.zarr"
        labelstore.merge([str(path) for path in order], out)
        merged = labelstore.open(out)
        tar = merged.read_tar(slice(None))
        in_shards = np.array([".tar/" in key for key in merged.keys])
        assert (~in_shards).sum() == len(image_folder) and (tar[~in_shards] == -1).all()
        np.testing.assert_array_equal(tar[in_shards], shard_tar)
        root = Path(merged.attrs["dataset"]["root"])
        images = ImageSource(str(root))
        for key, where in zip(merged.keys, tar):
            expected = (reference[key[key.index("imagenet22k-"):]] if ".tar/" in key
                        else (root / key).read_bytes())
            assert images.read(key, where) == expected, key
        report = labelstore.inspect_store(merged)
        assert report.rows_in_shards == len(shard_tar)
        assert f"{len(shard_tar)} rows in tar shards, {len(image_folder)} files" in str(report)
    labelstore.ensemble([pool, _shard_store(tmp_path / "u2.zarr", sh.find_shard_samples(
        str(tmp_path / "pool")), seed=5)], tmp_path / "e.zarr")
    np.testing.assert_array_equal(labelstore.open(tmp_path / "e.zarr").read_tar(slice(None)),
                                  shard_tar)


def reader_bytes(samples, row: int) -> bytes:
    return samples.reader().read(samples.keys[row], samples.tar[row])


@pytest.mark.slow
def test_index_built_by_two_ranks(tmp_path):
    """Two torchrun ranks list disjoint shares into one index equal to a one-process
    listing; damage on one rank's share stops both ranks with its message (no hang)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    make_shards(tmp_path / "in22k", 5, 3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get(
        "PYTHONPATH", "")]), OMP_NUM_THREADS="1")

    def torchrun(out):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(repo / "tests" / "shard_index_worker.py"), str(tmp_path / "in22k"), str(out)],
            env=env, capture_output=True, text=True, timeout=300)

    done = torchrun(tmp_path / "index")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "15 samples in 5 shards (5 listed)" in done.stdout
    loaded = sh.load_index(str(tmp_path / "index"))
    listed = sh.find_shard_samples(str(tmp_path / "in22k"))
    assert loaded.keys == listed.keys
    np.testing.assert_array_equal(loaded.tar, listed.tar)

    path = tmp_path / "in22k" / "imagenet22k-train-0003.tar"   # rank 1's share
    path.write_bytes(path.read_bytes()[:3000])
    failed = torchrun(tmp_path / "again")
    assert failed.returncode != 0
    assert failed.stderr.count("shard imagenet22k-train-0003.tar is truncated") == 2
    assert len(list((tmp_path / "again" / "parts").iterdir())) == 4


def test_index_command_options(in22k, tmp_path, capsys, monkeypatch):
    """``ssld index``: DALI's .idx files are used unless --no-dali-index, --listing-threads
    reaches the listing, a bad value is one line (exit 2)."""
    from cli import main as cli_main
    from teacher_infer.shards import _index

    wds2idx = pytest.importorskip("wds2idx")
    for path in sorted(in22k.glob("*.tar")):
        with wds2idx.IndexCreator(str(path), str(path.with_suffix(".idx")), verbose=False) as ic:
            ic.create_index()
    threads = []
    listed = _index.list_many
    monkeypatch.setattr(_index, "list_many", lambda *a, **kw: threads.append(kw["threads"])
                        or listed(*a, **kw))
    assert cli_main(["index", "--data", str(in22k), "--out", str(tmp_path / "a"),
                     "--no-progress"]) == 0
    assert "(3 listed, 3 from DALI .idx)" in capsys.readouterr().out
    assert cli_main(["index", "--data", str(in22k), "--out", str(tmp_path / "b"),
                     "--no-dali-index", "--listing-threads", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(3 listed)" in out and "DALI" not in out and threads == [None, 3]
    assert sh.load_index(str(tmp_path / "a")).keys == sh.load_index(str(tmp_path / "b")).keys
    assert cli_main(["index", "--data", str(in22k), "--out", str(tmp_path / "c"),
                     "--listing-threads", "0"]) == 2
    assert "--listing-threads" in capsys.readouterr().err
    assert cli_main(["index", "--data", str(tmp_path / "nothing-*.tar"), "--out",
                     str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matches no .tar file" in err
