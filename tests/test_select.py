"""``select-topk``: equality with a brute-force ranking, the output store, the CLI."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import zarr

import labelstore
from cli import main
from labelstore import _derive, _select


def pool_rows(n: int, *, views: int, k: int, classes: int, seed: int,
              invalid_fraction: float = 0.05) -> dict:
    """Random stored rows with many exact ties: probabilities are multiples of 1/32 (exact
    in float16), class ids skewed so that some classes have few candidates."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, classes + 1) ** 1.3
    scores = rng.random((n, views, classes)) * popularity  # skew: rare classes rank low
    indices = np.argsort(-scores, axis=-1)[..., :k]
    levels = np.sort(rng.integers(0, 32 // k, size=(n, views, k)), axis=-1)[..., ::-1]
    probs = levels / 32.0
    valid = rng.random(n) >= invalid_fraction
    h, w = rng.uniform(0.1, 1, (n, views)), rng.uniform(0.1, 1, (n, views))
    boxes = np.stack([rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w], -1)
    flips = rng.random((n, views)) < 0.5
    return dict(indices=indices, probs=probs, valid=valid, boxes=boxes, flips=flips,
                labels=np.where(rng.random(n) < 0.3, rng.integers(0, classes, n), -1),
                embeddings=rng.normal(size=(n, 8)).astype(np.float32))


def write_pool(path, keys, data, *, classes: int, chunk_rows: int, root=None,
               embeddings: bool = True, teacher: str = "resnet10t") -> str:
    n, views, k = data["indices"].shape
    attrs = {"teacher": {"model": teacher}, "class_names": [f"c{i}" for i in range(classes)]}
    if root is not None:
        attrs["dataset"] = {"root": root, "source": "folder"}
    with labelstore.create(path, keys=keys, num_classes=classes, topk=k, views=views,
                           labels=data["labels"], attrs=attrs, chunk_rows=chunk_rows,
                           embedding_dim=8 if embeddings else None) as writer:
        writer.write(0, data["indices"], data["probs"], boxes=data["boxes"], flips=data["flips"],
                     valid=data["valid"], embeddings=data["embeddings"] if embeddings else None)
    return str(path)


def brute_force(pools: list[dict], k: int, *, exclude=(), min_prob=None, view=0) -> dict:
    """Per class, every candidate sorted by (stored prob desc, global row asc), first k."""
    candidates: dict[int, list[tuple[float, int]]] = {}
    row = 0
    for pool in pools:
        stored = pool["probs"].astype(np.float16).astype(np.float64)
        for local in range(len(pool["keys"])):
            if pool["valid"][local] and pool["keys"][local] not in exclude:
                for slot in range(pool["indices"].shape[2]):
                    prob = stored[local, view, slot]
                    if min_prob is None or prob >= min_prob:
                        candidates.setdefault(int(pool["indices"][local, view, slot]),
                                              []).append((-prob, row))
            row += 1
    return {c: [(r, -p) for p, r in sorted(entries)[:k]] for c, entries in candidates.items()}


def as_dict(selection: _select.Selection) -> dict:
    out: dict[int, list] = {}
    for c, r, p in zip(selection.classes.tolist(), selection.rows.tolist(),
                       selection.probs.tolist()):
        out.setdefault(c, []).append((r, p))
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Force many read blocks, buffer filters and exact trims on test-sized pools, with
    coarse histogram buckets (half an octave) so that buckets hold many ties."""
    monkeypatch.setattr(_derive, "READ_ROWS", 96)
    monkeypatch.setattr(_select, "MIN_MERGE", 16)
    monkeypatch.setattr(_select, "BUCKET_SHIFT", 9)
    monkeypatch.setattr(_select, "NUM_BUCKETS", 0x8000 >> 9)
    monkeypatch.setattr(_select, "FLOOR_EVERY", 64)       # floors move after few candidates


def make_pools(tmp_path, sizes, *, classes=15, k=3, views=2, chunk_rows=32, roots=None,
               seed=0):
    paths, pools = [], []
    for i, n in enumerate(sizes):
        data = pool_rows(n, views=views, k=k, classes=classes, seed=seed + i)
        data["keys"] = [f"img/{i}_{r:05d}.jpg" for r in range(n)]
        root = None if roots is None else roots[i]
        paths.append(write_pool(tmp_path / f"pool{i}.zarr", data["keys"], data,
                                classes=classes, chunk_rows=chunk_rows, root=root))
        pools.append(data)
    return paths, pools


@pytest.mark.parametrize("sizes,k,min_prob,view,n_exclude", [
    ((700,), 20, None, 0, 0),
    ((700,), 1, None, 1, 0),
    ((300, 250, 400), 40, None, 0, 60),      # multi-store pool, excluded keys
    ((500, 500), 7, 3 / 32, 1, 25),          # min-prob on an exactly representable level
    ((900,), 500, 0.1, 0, 0),                # 0.1 is not a float16: compare exact values
])
def test_rank_equals_brute_force(tmp_path, small_blocks, sizes, k, min_prob, view, n_exclude):
    paths, pools = make_pools(tmp_path, sizes)
    rng = np.random.default_rng(1)
    all_keys = [key for pool in pools for key in pool["keys"]]
    exclude = set(rng.choice(all_keys, n_exclude, replace=False).tolist()) if n_exclude else set()
    stores = [labelstore.open(p) for p in paths]
    selection = _select.rank(stores, k, exclude=exclude or None, min_prob=min_prob, view=view)
    expected = brute_force(pools, k, exclude=exclude, min_prob=min_prob, view=view)
    assert as_dict(selection) == expected
    counts = selection.counts
    # the cases really exercise ties, short classes and skipped rows
    assert any(len(v) < k for v in expected.values()) or len(expected) < 15 or k == 1
    assert (counts <= k).all() and counts.sum() == sum(len(v) for v in expected.values())
    assert selection.rows_invalid == sum(int((~p["valid"]).sum()) for p in pools)
    valid_keys = {key for p in pools for key, v in zip(p["keys"], p["valid"]) if v}
    assert selection.rows_excluded == len(exclude & valid_keys)


def test_streaming_bounds_are_exercised(tmp_path, small_blocks, monkeypatch):
    calls = {"_update_floors": 0, "_filter": 0, "_trim": 0}
    for name in calls:
        original = getattr(_select._ClassTopK, name)

        def spy(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)
        monkeypatch.setattr(_select._ClassTopK, name, spy)
    paths, pools = make_pools(tmp_path, (1500,), classes=6, k=3)
    selection = _select.rank([labelstore.open(paths[0])], 4)
    assert as_dict(selection) == brute_force(pools, 4)
    # the histogram floors move, the buffer is filtered and trimmed while streaming
    assert calls["_update_floors"] >= 2 and calls["_filter"] >= 2 and calls["_trim"] >= 3, calls


def test_ties_break_by_pool_order_and_outside_topk_ranks_below(tmp_path):
    # Four rows, C = 4, k = 2: rows 0-2 give class 0 the same probability.
    indices = np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[1, 2]]])
    probs = np.array([[[0.5, 0.25]], [[0.5, 0.25]], [[0.5, 0.125]], [[0.5, 0.5]]])
    data = dict(indices=indices, probs=probs, valid=np.ones(4, bool), labels=np.full(4, -1),
                boxes=None, flips=None, embeddings=None)
    path = tmp_path / "tie.zarr"
    with labelstore.create(path, keys=list("abcd"), num_classes=4, topk=2) as writer:
        writer.write(0, data["indices"], data["probs"])
    selection = _select.rank([labelstore.open(path)], 2)
    picks = as_dict(selection)
    assert picks[0] == [(0, 0.5), (1, 0.5)]          # row 2 ties and loses to earlier rows
    assert picks[1] == [(3, 0.5), (0, 0.25)]
    # class 3 is inside only row 2's top-k: the other rows are not candidates for it
    assert picks[3] == [(2, 0.125)]


def read_raw(path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in group.array_keys()}


def test_output_store_is_a_bit_exact_copy_with_provenance(tmp_path, small_blocks):
    paths, pools = make_pools(tmp_path, (300, 200), roots=["/data/pool_a", "/data/pool_a"])
    exclude = tmp_path / "dups.tsv"
    exclude.write_text("# ssld dedup: pool=... query=...\n"
                       "# pool_key\tquery_key\tcosine\tinliers\n"
                       "img/0_00003.jpg\tval/x.jpg\t0.97\t120\n\n"
                       "img/1_00010.jpg\tval/y.jpg\t0.9\t55\n")
    out = tmp_path / "sel.zarr"
    listing = tmp_path / "sel.txt"
    result = labelstore.select_topk(paths, 12, out, exclude=str(exclude), list_out=str(listing),
                                    chunk_rows=16)
    selected = np.unique(result.selection.rows)
    raw_sources = [read_raw(p) for p in paths]
    raw_out = read_raw(out)
    assert len(raw_out["keys"]) == len(selected) == result.rows_written
    for name in ("indices", "probs", "residual", "boxes", "flips", "valid", "labels", "embeddings",
                 "keys"):
        expected = np.concatenate([raw[name] for raw in raw_sources])[selected]  # pool order
        np.testing.assert_array_equal(raw_out[name], expected, err_msg=name)
        assert raw_out[name].dtype == raw_sources[0][name].dtype
    assert "img/0_00003.jpg" not in set(raw_out["keys"].tolist())
    st = labelstore.open(out)
    assert st.is_complete and st.attrs["complete"]
    assert st.attrs["dataset"]["root"] == "/data/pool_a"   # same root: keys unchanged
    assert st.class_names == [f"c{i}" for i in range(15)] and st.teacher_name == "resnet10t"
    entry = st.attrs["provenance"][-1]
    assert entry["command"] == "select-topk" and entry["k"] == 12 and entry["view"] == 0
    assert [s["fingerprint"] for s in entry["sources"]] == [
        labelstore.fingerprint(p["keys"]) for p in pools]
    assert entry["exclude"]["sha256"] == hashlib.sha256(exclude.read_bytes()).hexdigest()
    assert entry["exclude"]["keys"] == 2
    assert entry["per_class_counts"] == result.selection.counts.tolist()
    lines = listing.read_text().splitlines()
    assert lines == [f"{key} {int(top1)}" for key, top1 in
                     zip(raw_out["keys"].tolist(), raw_out["indices"][:, 0, 0])]
    text = str(result)
    assert "scanned 500 rows in 2 store(s)" in text and "per-class count: min" in text
    assert "score threshold" in text and "fewer than 12 candidates" in text


@pytest.mark.parametrize("embeddings", [False, True])
def test_copy_over_several_copy_blocks_is_bit_exact(tmp_path, small_blocks, monkeypatch,
                                                    embeddings):
    # READ_ROWS = 96, chunks of 32: rows without embeddings are copied COPY_BLOCKS read
    # blocks (384 rows) at a time, so 1,000 rows take three copies, each ending mid-chunk
    # of the output (chunks of 24); with embeddings a read block at a time.
    data = pool_rows(1000, views=2, k=3, classes=15, seed=3)
    keys = [f"img/{r:05d}.jpg" for r in range(1000)]
    path = write_pool(tmp_path / "pool.zarr", keys, data, classes=15, chunk_rows=32,
                      embeddings=embeddings)
    calls = []
    original = labelstore.LabelStoreWriter.write_stored

    def spy(self, start, rows):
        calls.append(len(rows["indices"]))
        return original(self, start, rows)
    monkeypatch.setattr(labelstore.LabelStoreWriter, "write_stored", spy)
    result = labelstore.select_topk(path, 40, tmp_path / "sel.zarr", chunk_rows=24)
    selected = np.unique(result.selection.rows)
    step = 96 * (1 if embeddings else _derive.COPY_BLOCKS)
    assert len(calls) == len(_derive.spans(labelstore.open(path), selected, step)) == (
        len(np.unique(selected // step))) and sum(calls) == len(selected)
    assert len(calls) == (3 if not embeddings else len(np.unique(selected // 96))) > 2
    raw, raw_out = read_raw(path), read_raw(tmp_path / "sel.zarr")
    assert set(raw_out) == set(raw)
    for name, values in raw.items():
        if name != "done":
            np.testing.assert_array_equal(raw_out[name], values[selected], err_msg=name)
    assert labelstore.open(tmp_path / "sel.zarr").is_complete


def test_different_roots_get_a_common_root_and_prefixed_keys(tmp_path):
    paths, pools = make_pools(tmp_path, (120, 80), roots=["/data/imagenet22k/a", "/data/extra"])
    out = tmp_path / "sel.zarr"
    labelstore.select_topk(paths, 5, out)
    st = labelstore.open(out)
    assert st.attrs["dataset"]["root"] == "/data"
    keys = st.keys.tolist()
    assert all(k.startswith(("imagenet22k/a/img/0_", "extra/img/1_")) for k in keys)
    assert any(k.startswith("extra/") for k in keys)
    prefixes = [s["key_prefix"] for s in st.attrs["provenance"][-1]["sources"]]
    assert prefixes == ["imagenet22k/a/", "extra/"]


def test_same_key_in_two_pools_is_kept_once(tmp_path):
    data = pool_rows(50, views=1, k=2, classes=4, seed=3, invalid_fraction=0)
    keys = [f"x/{i}.jpg" for i in range(50)]
    a = write_pool(tmp_path / "a.zarr", keys, data, classes=4, chunk_rows=16)
    b = write_pool(tmp_path / "b.zarr", keys, data, classes=4, chunk_rows=16)
    result = labelstore.select_topk([a, b], 50, tmp_path / "o.zarr")
    st = labelstore.open(tmp_path / "o.zarr")
    assert len(set(st.keys.tolist())) == len(st) == result.rows_written
    assert result.duplicate_keys_dropped > 0
    assert result.selection.rows.max() < 50   # every pick of the second copy went away


def test_exclude_file_matches_key_or_root_path(tmp_path):
    keys, sha = _select.read_exclude(_write(tmp_path / "x.txt",
                                            "# c\n a b.jpg \n/r/c.jpg\tq\t0.9\t-\n\n"))
    assert keys == {"a b.jpg", "/r/c.jpg"} and len(sha) == 64
    hit = _select._excluded(np.array(["a b.jpg", "c.jpg", "d.jpg"]), _select._for_store(keys, "/r"))
    assert hit.tolist() == [True, True, False]


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_input_is_rejected(tmp_path):
    paths, _ = make_pools(tmp_path, (60,), classes=6, k=2, views=1)
    out = tmp_path / "o.zarr"
    with pytest.raises(ValueError, match="k must be a positive integer"):
        labelstore.select_topk(paths, 0, out)
    with pytest.raises(ValueError, match="--min-prob must be within"):
        labelstore.select_topk(paths, 3, out, min_prob=1.5)
    with pytest.raises(ValueError, match="view 1 is out of range"):
        labelstore.select_topk(paths, 3, out, view=1)
    with pytest.raises(ValueError, match="one of the input stores"):
        labelstore.select_topk(paths, 3, paths[0], overwrite=True)
    with pytest.raises(ValueError, match="nothing selected"):
        labelstore.select_topk(paths, 3, out, min_prob=1.0)
    with pytest.raises(FileNotFoundError, match="exclude file"):
        labelstore.select_topk(paths, 3, out, exclude=str(tmp_path / "none.txt"))
    other = pool_rows(30, views=1, k=3, classes=6, seed=9)
    odd = write_pool(tmp_path / "k3.zarr", [f"o{i}" for i in range(30)], other, classes=6,
                     chunk_rows=16)
    with pytest.raises(ValueError, match=r"topk differs: .*pool0.zarr has 2, .*k3.zarr has 3"):
        labelstore.select_topk([paths[0], odd], 3, out)
    partial = labelstore.create(tmp_path / "part.zarr", keys=["a", "b"], num_classes=6, topk=2,
                                chunk_rows=1)
    partial.write(0, np.array([[[0, 1]]]), np.array([[[0.5, 0.25]]]))
    partial.close()
    with pytest.raises(ValueError, match="incomplete"):
        labelstore.select_topk([tmp_path / "part.zarr"], 3, out)
    labelstore.select_topk(paths, 3, out)
    with pytest.raises(FileExistsError):
        labelstore.select_topk(paths, 3, out)
    labelstore.select_topk(paths, 3, out, overwrite=True)


def test_cli_select_topk(tmp_path, capsys):
    paths, pools = make_pools(tmp_path, (200, 100), classes=8, k=2, views=1)
    out, listing = str(tmp_path / "sel.zarr"), str(tmp_path / "list.txt")
    code = main(["select-topk", "--store", paths[0], "--store", paths[1], "--k", "4",
                 "--out", out, "--list-out", listing, "--min-prob", "0.05"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "scanned 300 rows in 2 store(s)" in captured.out
    st = labelstore.open(out)
    assert len(st) == len(open(listing).read().splitlines()) <= 8 * 4
    assert st.attrs["provenance"][-1]["min_prob"] == 0.05
    for bad in (["--k", "0"], ["--k", "4", "--view", "3"], ["--k", "4", "--min-prob", "2"]):
        code = main(["select-topk", "--store", paths[0], "--out", str(tmp_path / "b.zarr"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and err.strip() and len(err.strip().splitlines()) <= 3, err
    code = main(["select-topk", "--store", str(tmp_path / "missing.zarr"), "--k", "3",
                 "--out", str(tmp_path / "b.zarr")])
    assert code == 2 and "no label store" in capsys.readouterr().err
    code = main(["select-topk", "--store", paths[0], "--k", "3", "--out", out])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b.zarr")


@pytest.mark.parametrize("where", ["directory", "missing folder"])
def test_cli_list_out_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys,
                                                                        monkeypatch, where):
    paths, _ = make_pools(tmp_path, (60,), classes=6, k=2, views=1)
    listing = tmp_path / "lists"
    if where == "directory":
        listing.mkdir()
        (listing / "keep.txt").write_text("mine")
    else:
        listing = listing / "sub" / "list.txt"
    monkeypatch.setattr(_select, "rank", lambda *a, **k: pytest.fail("ranked before refusing"))
    code = main(["select-topk", "--store", paths[0], "--k", "3", "--out",
                 str(tmp_path / "sel.zarr"), "--list-out", str(listing)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ssld: error: --list-out "), err
    assert ("is a directory" if where == "directory" else "does not exist") in err
    assert not (tmp_path / "sel.zarr").exists()
    if where == "directory":
        assert (listing / "keep.txt").read_text() == "mine"


def test_exclude_file_with_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"a.jpg\nb.jpg\r\nc\xff.jpg\n")
    with pytest.raises(ValueError, match=f"exclude file {path}:3: not valid UTF-8 "
                                         r"\(byte 0xff\)"):
        _select.read_exclude(str(path))


def test_select_rows_is_select_topk_without_the_write(tmp_path, small_blocks):
    """labelstore.select_rows: the rows select-topk ranks, from the same arguments (an
    exclude file, min_prob, view), checked against the brute force; nothing is written, and
    bad arguments are refused as select-topk refuses them."""
    paths, pools = make_pools(tmp_path, (300, 250))
    excluded = pools[0]["keys"][:40:3]
    exclude = _write(tmp_path / "x.txt", "\n".join(excluded) + "\n")
    before = sorted(os.listdir(tmp_path))
    selection = labelstore.select_rows(paths, 9, exclude=exclude, min_prob=2 / 32, view=1)
    assert sorted(os.listdir(tmp_path)) == before
    assert as_dict(selection) == brute_force(pools, 9, exclude=set(excluded), min_prob=2 / 32,
                                             view=1)
    written = labelstore.select_topk(paths, 9, tmp_path / "s.zarr", exclude=exclude,
                                     min_prob=2 / 32, view=1)
    assert as_dict(written.selection) == as_dict(selection)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        labelstore.select_rows(paths, 0)
    with pytest.raises(ValueError, match="view 2 is out of range"):
        labelstore.select_rows(paths, 3, view=2)
