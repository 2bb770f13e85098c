"""``dedup``: planted near-duplicates of query images inside a pool of distinct images.

Stage 1 is also checked on random embeddings against a brute-force float64 cosine matrix,
on every path (numpy, torch fp32, torch fp16 as on CUDA, pool shares as under torchrun).

The images are generated (colour fields, shapes, text, noise) and written to disk under
dataset roots; the embeddings are a deterministic "tiny image" descriptor (16×16 gray,
mean-free, unit norm — Torralba et al.'s near-duplicate feature), written into the stores
with ``labelstore.create(..., embedding_dim=256)`` as ``infer-teacher --embeddings`` would.
"""
from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import labelstore
from cli import main
from labelstore import _derive
from teacher_infer.dedup import DedupConfig
from teacher_infer.dedup import dedup as run_dedup
from teacher_infer.dedup import rules as _dedup_rules
from teacher_infer.dedup import run as _dedup_run
from teacher_infer.dedup import search as _dedup_search
from teacher_infer.dedup import sift as _dedup_sift
from teacher_infer.dedup.search import Candidates

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = ("--threads", "1")   # a shared two-core machine: one thread per process


def dedup(query, pool, out=None, **options):
    """``ssld dedup`` from Python, on one thread unless ``threads`` says otherwise."""
    return run_dedup(DedupConfig(query=query, pool=pool, out=out, **{"threads": 1, **options}))

FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
         cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)


def colour_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random background: a coarse random colour grid, upsampled bicubically."""
    grid = rng.uniform(0, 255, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    return cv2.resize(grid, (int(width), int(height)), interpolation=cv2.INTER_CUBIC)


def natural_image(rng: np.random.Generator, background: np.ndarray | None = None) -> np.ndarray:
    """A varied 'natural-ish' BGR image: colour field, shapes, text and sensor-like noise."""
    if background is None:
        background = colour_field(rng, *rng.integers(200, 321, 2))
    image = np.clip(background, 0, 255).astype(np.uint8).copy()
    height, width = image.shape[:2]
    for _ in range(rng.integers(6, 14)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        thickness = int(rng.choice([-1, 1, 2, 3]))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        kind = rng.integers(4)
        if kind == 0:
            cv2.circle(image, (x, y), int(rng.integers(5, width // 4)), colour, thickness)
        elif kind == 1:
            corner = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.rectangle(image, (x, y), corner, colour, thickness)
        elif kind == 2:
            points = rng.integers(0, [width, height], size=(int(rng.integers(3, 7)), 2))
            cv2.fillPoly(image, [points.astype(np.int32)], colour)
        else:
            cv2.line(image, (x, y), (int(rng.integers(0, width)), int(rng.integers(0, height))),
                     colour, max(1, thickness))
    for _ in range(rng.integers(1, 4)):
        text = "".join(rng.choice(list(string.ascii_letters + string.digits), rng.integers(3, 9)))
        cv2.putText(image, text, (int(rng.integers(0, width // 2)), int(rng.integers(20, height))),
                    int(rng.choice(FONTS)), float(rng.uniform(0.6, 1.6)),
                    tuple(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(1, 3)))
    noise = rng.normal(0, 4, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def near_duplicate(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """The edits of the issue: border crop up to 10% per side, resize, brightness/contrast
    shift, then JPEG at quality 40-60."""
    height, width = image.shape[:2]
    top, bottom = (rng.uniform(0, 0.10, 2) * height).astype(int)
    left, right = (rng.uniform(0, 0.10, 2) * width).astype(int)
    crop = image[top:height - bottom, left:width - right]
    scale = rng.uniform(0.6, 1.5)
    crop = cv2.resize(crop, None, fx=scale, fy=scale,
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    crop = cv2.convertScaleAbs(crop, alpha=rng.uniform(0.75, 1.3), beta=rng.uniform(-30, 30))
    ok, encoded = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 61))])
    return encoded.tobytes()


def tiny_image_embedding(path: str) -> np.ndarray:
    """16×16 gray thumbnail, mean removed, unit norm (brightness/contrast invariant)."""
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    thumb = cv2.resize(gray, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    thumb -= thumb.mean()
    return thumb / (np.linalg.norm(thumb) + 1e-6)


def embed_store(path, root, keys, *, valid=None, classes=5) -> str:
    """A label store over images on disk, with tiny-image embeddings."""
    embeddings = np.stack([tiny_image_embedding(str(root / key)) for key in keys])
    n = len(keys)
    with labelstore.create(path, keys=keys, num_classes=classes, topk=2, embedding_dim=256,
                           attrs={"dataset": {"root": str(root)}}) as writer:
        writer.write(0, np.tile([[[0, 1]]], (n, 1, 1)), np.full((n, 1, 2), 0.25), valid=valid,
                     embeddings=embeddings)
    return str(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 query (val) images; a pool of 260 distinct images, 20 'hard negatives' that share
    a query's background, and 36 planted near-duplicates (30 queries, 6 of them twice)."""
    base = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(0)
    val_root, pool_root = base / "val", base / "pool"
    (val_root / "images").mkdir(parents=True)
    (pool_root / "images").mkdir(parents=True)
    backgrounds = [colour_field(rng, *rng.integers(200, 321, 2)) for _ in range(40)]
    queries = [natural_image(rng, bg) for bg in backgrounds]
    query_keys = [f"images/val_{i:03d}.png" for i in range(40)]
    for key, image in zip(query_keys, queries):
        cv2.imwrite(str(val_root / key), image)
    pool_keys, truth = [], set()
    for i in range(260):
        key = f"images/distinct_{i:04d}.jpg"
        cv2.imwrite(str(pool_root / key), natural_image(rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
        pool_keys.append(key)
    for i in range(20):  # same colour field as a query, different content
        key = f"images/lookalike_{i:03d}.jpg"
        cv2.imwrite(str(pool_root / key), natural_image(rng, backgrounds[i]))
        pool_keys.append(key)
    for q in list(range(30)) + list(range(6)):
        key = f"images/copy_{len(truth):03d}_of_{q:03d}.jpg"
        (pool_root / key).write_bytes(near_duplicate(queries[q], rng))
        pool_keys.append(key)
        truth.add((key, query_keys[q]))
    order = rng.permutation(len(pool_keys))  # planted copies spread through the pool
    pool_keys = [pool_keys[i] for i in order]
    valid = np.ones(len(pool_keys), dtype=bool)
    broken = pool_keys.index("images/distinct_0007.jpg")
    valid[broken] = False  # an undecodable pool row takes no part
    return dict(query=embed_store(base / "val.zarr", val_root, query_keys),
                pool=embed_store(base / "pool.zarr", pool_root, pool_keys, valid=valid),
                truth=truth, base=base, broken=pool_keys[broken])


THRESHOLD = 0.6   # tiny-image cosine; chosen from the measured distributions (see README)


@pytest.fixture(scope="module")
def found(planted):
    """One full dedup run (SIFT verification), shared by the tests that read its output."""
    out = planted["base"] / "dups.tsv"
    result = dedup(planted["query"], planted["pool"], str(out), threshold=THRESHOLD,
                              pool_batch=64, query_batch=16)
    return result, out


def test_planted_duplicates_are_found_without_false_positives(planted, found):
    result, out = found
    found = set(zip(result.pool_keys, result.query_keys))
    truth = planted["truth"]
    recall = len(found & truth) / len(truth)
    false_positives = found - truth
    print(f"\nstage 1: {result.candidates} candidate pairs; confirmed {len(found)}; "
          f"recall {recall:.3f}; false positives {len(false_positives)}")
    assert recall >= 0.95, sorted(truth - found)
    assert not false_positives
    # the stage-1 candidates included look-alikes that SIFT had to reject
    assert result.candidates > len(found)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# ssld dedup:")
    assert lines[1] == "# pool_key\tquery_key\tcosine\tinliers"
    fields = [line.split("\t") for line in lines[2:]]
    assert len(fields) == len(found) and all(len(f) == 4 for f in fields)
    assert all(float(f[2]) >= THRESHOLD and int(f[3]) >= _dedup_sift.DEFAULT_MIN_INLIERS
               for f in fields)


def test_stage_one_matches_a_full_similarity_matrix(planted):
    query, pool = labelstore.open(planted["query"]), labelstore.open(planted["pool"])
    pairs = _dedup_search.search(query, pool, threshold=0.3, top_m=3, pool_batch=50, query_batch=7)
    q = query.read_embeddings(slice(None))
    p = pool.read_embeddings(slice(None))
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1,
                                                                               keepdims=True)).T
    sims[:, ~pool.read(slice(None)).valid] = -np.inf
    expected = []
    for row in range(len(q)):
        order = np.lexsort((np.arange(len(p)), -sims[row]))[:3]
        expected += [(row, int(c)) for c in order if sims[row, c] >= 0.3]
    assert list(zip(pairs.query_rows.tolist(), pairs.pool_rows.tolist())) == expected
    np.testing.assert_allclose(pairs.cosines, [sims[r, c] for r, c in expected], atol=1e-5)


def test_dedup_output_excludes_duplicates_in_select_topk(planted, found):
    result, out = found
    selected = labelstore.select_topk(planted["pool"], 1000, planted["base"] / "sel.zarr",
                                      exclude=str(out), overwrite=True)
    keys = set(labelstore.open(planted["base"] / "sel.zarr").keys.tolist())
    assert selected.selection.rows_excluded == len(set(result.pool_keys))
    assert not keys & set(result.pool_keys) and planted["broken"] not in keys


def test_verify_none_reports_every_candidate(planted):
    result = dedup(planted["query"], planted["pool"], threshold=THRESHOLD,
                              verify="none")
    assert result.duplicates == result.candidates and set(result.inliers) == {-1}
    assert result.lines()[2].endswith("\t-")


@pytest.mark.parametrize("seed", range(4))
def test_sift_rejects_unrelated_images_and_accepts_edited_copies(tmp_path, seed):
    rng = np.random.default_rng(seed)
    image, other = natural_image(rng), natural_image(rng)
    features = {}
    for name, data in (("a.png", cv2.imencode(".png", image)[1].tobytes()),
                       ("b.jpg", near_duplicate(image, rng)),
                       ("c.png", cv2.imencode(".png", other)[1].tobytes())):
        (tmp_path / name).write_bytes(data)
        features[name] = _dedup_sift.sift_features(str(tmp_path / name))
    assert (_dedup_sift.count_inliers(features["a.png"], features["b.jpg"])
            >= _dedup_sift.DEFAULT_MIN_INLIERS)
    unrelated = _dedup_sift.count_inliers(features["a.png"], features["c.png"])
    assert unrelated < _dedup_sift.DEFAULT_MIN_INLIERS / 2
    assert _dedup_sift.sift_features(str(tmp_path / "missing.jpg")) is None


def test_missing_embeddings_and_bad_input_are_clear_errors(planted, tmp_path, capsys):
    bare = tmp_path / "bare.zarr"
    with labelstore.create(bare, keys=["a"], num_classes=3, topk=1) as writer:
        writer.write(0, np.array([[[0]]]), np.array([[[0.9]]]))
    with pytest.raises(ValueError, match="has no embeddings: run `ssld infer-teacher"):
        dedup(planted["query"], bare)
    with pytest.raises(ValueError, match="image folder, not a label store"):
        dedup(planted["base"] / "val", planted["pool"])
    with pytest.raises(ValueError, match="verify must be"):
        dedup(planted["query"], planted["pool"], verify="orb")
    with pytest.raises(ValueError, match="threshold must be"):
        dedup(planted["query"], planted["pool"], threshold=2)
    with pytest.raises(FileNotFoundError, match="--pool-root .*nowhere is not a folder here"):
        dedup(planted["query"], planted["pool"], pool_root=str(tmp_path / "nowhere"))
    code = main(["dedup", "--query", planted["query"], "--pool", str(bare)])
    assert code == 2 and "has no embeddings" in capsys.readouterr().err


def test_cli_dedup_writes_the_list(planted, capsys):
    out = planted["base"] / "cli.tsv"
    code = main(["dedup", "--query", planted["query"], "--pool", planted["pool"], "--out", str(out),
                 "--threshold", str(THRESHOLD), "--top-m", "1", *ONE_THREAD])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "confirmed by SIFT" in captured.out
    pairs = {tuple(line.split("\t")[:2]) for line in out.read_text().splitlines()[2:]}
    assert len(pairs) >= 28 and pairs <= planted["truth"]   # 30 queries have a copy
    code = main(["dedup", "--query", planted["query"], "--pool", planted["pool"],
                 "--threshold", str(THRESHOLD), "--verify", "none", *ONE_THREAD])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("# ssld dedup:") and "compared" in captured.err


def test_cli_dedup_out_that_cannot_be_written_is_refused_before_the_search(planted, tmp_path,
                                                                           capsys, monkeypatch):
    monkeypatch.setattr(_dedup_run, "search", lambda *a, **k: pytest.fail("searched first"))
    folder = tmp_path / "out_dir"
    folder.mkdir()
    for out, message in ((folder, f"--out {folder} is a directory"),
                         (tmp_path / "no" / "pairs.tsv", "does not exist")):
        code = main(["dedup", "--query", planted["query"], "--pool", planted["pool"],
                     "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err



def test_cli_dedup_is_refused_while_another_run_writes_the_same_list(planted, tmp_path, capsys,
                                                                    monkeypatch):
    """Two runs on one --out would append to the same stage-2 progress files: the second is
    refused before its search (OUT.lock, as for every output), the first run's files kept."""
    out = tmp_path / "pairs.tsv"
    out.write_text("# ssld dedup: an earlier list\n")
    args = ["dedup", "--query", planted["query"], "--pool", planted["pool"], "--out", str(out),
            "--threshold", str(THRESHOLD), "--verify", "none", *ONE_THREAD]
    with monkeypatch.context() as patch, labelstore.OutputLock(out, command="the other dedup"):
        patch.setattr(_dedup_run, "search", lambda *a, **k: pytest.fail("searched"))
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "being written by another ssld run" in err and "the other dedup" in err
    assert out.read_text() == "# ssld dedup: an earlier list\n"
    assert main(args) == 0, capsys.readouterr().err   # the lock is free again, and let go after
    assert out.read_text().startswith("# ssld dedup:") and len(out.read_text().splitlines()) > 2
    assert not Path(str(out) + ".lock").exists()


# -- stage 1 on random embeddings: every path equals a brute-force float64 reference ---------

def _embedding_store(path, embeddings, valid=None):
    n = len(embeddings)
    with labelstore.create(path, keys=[f"img_{i:05d}" for i in range(n)], num_classes=3,
                           topk=1, embedding_dim=embeddings.shape[1], chunk_rows=64) as writer:
        writer.write(0, np.zeros((n, 1, 1), dtype=int), np.full((n, 1, 1), 0.5), valid=valid,
                     embeddings=embeddings)
    return labelstore.open(path)


@pytest.fixture(scope="module")
def random_stores(tmp_path_factory):
    """40 queries, 3,000 pool rows (D = 48, float16 as stored): near-copies of most
    queries at several noise levels, 3 exact copies of query 0 and 30 of query 1 (ties;
    30 > top_m + EXTRA forces a second pass), invalid rows and an all-zero row (a NaN row is
    damage: the writer refuses it, see test_non_finite_embeddings_are_damage)."""
    base = tmp_path_factory.mktemp("random")
    rng = np.random.default_rng(7)
    queries = rng.normal(size=(40, 48)).astype(np.float16)
    pool = rng.normal(size=(3000, 48)).astype(np.float16)
    for row in range(0, 3000, 9):
        noise = rng.choice([0.05, 0.3, 0.8])
        pool[row] = queries[row % 40].astype(np.float32) + rng.normal(scale=noise, size=48)
    copies_of_0 = [17, 1400, 2999]
    copies_of_1 = list(range(5, 3000, 100))
    pool[copies_of_0], pool[copies_of_1] = queries[0], queries[1]
    pool[22] = 0
    valid = np.ones(3000, dtype=bool)
    valid[[1400, 38]] = False                 # an exact copy that is not valid takes no part
    query_valid = np.ones(40, dtype=bool)
    query_valid[39] = False
    return dict(query=_embedding_store(base / "q.zarr", queries, query_valid),
                pool=_embedding_store(base / "p.zarr", pool, valid),
                queries=queries, pool_embeddings=pool, valid=valid, query_valid=query_valid,
                copies_of_1=copies_of_1)


def brute_force(stores, threshold, top_m):
    """Per query the top_m pool rows by float32(float64 cosine), ties to the lower row."""
    q = stores["queries"].astype(np.float64)
    p = stores["pool_embeddings"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sims = (q @ p.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(p, axis=1))
    sims = sims.astype(np.float32)
    usable = stores["valid"] & np.isfinite(sims).all(axis=0)
    expected = []
    for row in np.flatnonzero(stores["query_valid"]):
        order = np.lexsort((np.arange(len(p)), -sims[row]))
        order = [c for c in order if usable[c] and float(sims[row, c]) >= threshold][:top_m]
        expected += [(int(row), int(c), float(sims[row, c])) for c in order]
    return expected


def as_list(pairs: Candidates):
    return list(zip(pairs.query_rows.tolist(), pairs.pool_rows.tolist(),
                    pairs.cosines.astype(float).tolist()))


@pytest.mark.parametrize("threshold,top_m", [(0.5, 5), (0.9, 1), (-1.0, 3)])
def test_stage_one_is_exact_on_every_path(random_stores, monkeypatch, threshold, top_m):
    query, pool = random_stores["query"], random_stores["pool"]
    expected = brute_force(random_stores, threshold, top_m)
    runs = {
        "numpy": _dedup_search.search(query, pool, threshold=threshold, top_m=top_m, device="numpy",
                               pool_batch=250, query_batch=7),
        "torch cpu": _dedup_search.search(query, pool, threshold=threshold, top_m=top_m,
                                          device="cpu"),
        "torch cpu, blocks of 97": _dedup_search.search(query, pool, threshold=threshold,
                                                        top_m=top_m, device="cpu", pool_batch=97),
        "torch fp16 (the CUDA path)": _dedup_search.search_torch(
            query, pool, threshold=threshold, top_m=top_m, device="cpu", pool_batch=500,
            precision="fp16"),
        "torch bf16": _dedup_search.search(query, pool, threshold=threshold, top_m=top_m,
                                    device="cpu", precision="bf16"),
    }
    # torchrun: three ranks, each a share of the pool blocks (blocks of 256 rows here)
    monkeypatch.setattr(_derive, "READ_ROWS", 256)
    shares = [_dedup_search.search(query, pool, threshold=threshold, top_m=top_m, device="cpu",
                            part=(rank, 3)) for rank in range(3)]
    for rank, share in enumerate(shares):      # each rank saw only its own blocks
        assert set((share.pool_rows // 256 % 3).tolist()) <= {rank}
    runs["3 pool shares"] = Candidates.best_of(shares, top_m)
    for name, pairs in runs.items():
        assert as_list(pairs) == expected, name
    # the ties: query 1's copies in pool-row order, the invalid copy of query 0 absent
    first = [c for r, c, _ in expected if r == 1]
    assert first == random_stores["copies_of_1"][:top_m]
    assert 1400 not in [c for r, c, _ in expected if r == 0]
    if threshold == 0.5:
        assert runs["torch cpu"].passes == 2    # 30 tied copies > top_m + EXTRA


def test_certification_needs_a_second_pass_only_for_the_tied_query(random_stores):
    pairs = _dedup_search.search_torch(random_stores["query"], random_stores["pool"],
                                       threshold=0.5, top_m=2, device="cpu")
    assert pairs.passes == 2
    widened = _dedup_search.EXTRA
    try:
        _dedup_search.EXTRA = 40
        again = _dedup_search.search_torch(random_stores["query"], random_stores["pool"],
                                           threshold=0.5, top_m=2, device="cpu")
    finally:
        _dedup_search.EXTRA = widened
    assert again.passes == 1 and as_list(again) == as_list(pairs)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_error_bound_covers_the_device_products(precision):
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    rng = np.random.default_rng(3)
    for dim in (48, 2048):
        a = rng.normal(size=(64, dim)).astype(np.float16).astype(np.float64)
        b = rng.normal(size=(64, dim)).astype(np.float16).astype(np.float64)
        b[:8] = a[:8] + rng.normal(scale=0.01, size=(8, dim))   # cosines near 1 as well
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        exact = a @ b.T
        approx = (torch.from_numpy(a).float().to(dtype) @ torch.from_numpy(b).float().to(dtype).T)
        error = np.abs(approx.float().numpy() - exact).max()
        assert error < _dedup_search.slack(dim, precision) / 2, (dim, error)


def test_unknown_or_missing_device_is_a_clear_error(random_stores):
    with pytest.raises(ValueError, match="device must be"):
        _dedup_search.search(random_stores["query"], random_stores["pool"], device="tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            _dedup_search.search(random_stores["query"], random_stores["pool"], device="cuda")


# -- rules ------------------------------------------------------------------------------------

def test_component_rule_drops_whole_components():
    # q0 —p10 (confirmed), q0 —p11, q1 —p11, q1 —p12 (a chain through p11);
    # q2 —p13 alone and unconfirmed; q3 —p14 confirmed but below 0.9.
    pairs = Candidates(np.array([0, 0, 1, 1, 2, 3]), np.array([10, 11, 11, 12, 13, 14]),
                       np.array([0.99, 0.95, 0.93, 0.91, 0.97, 0.85], dtype=np.float32))
    confirmed = np.array([True, False, False, False, False, True])
    best = _dedup_rules.removed_pairs(pairs, confirmed, "best", 0.8)
    component = _dedup_rules.removed_pairs(pairs, confirmed, "component", 0.8)
    assert best.tolist() == [True, False, False, False, False, True]
    assert component.tolist() == [True, True, True, True, False, True]
    # at 0.94 the chain is cut after p11: q1's pairs fall below the threshold
    assert _dedup_rules.removed_pairs(pairs, confirmed, "component", 0.94).tolist() == \
        [True, True, False, False, False, False]
    report = _dedup_rules.rule_report(pairs, confirmed, [0.8, 0.94, 0.99])
    assert report == [{"threshold": 0.8, "pairs": 6, "best": 2, "component": 4},
                      {"threshold": 0.94, "pairs": 3, "best": 1, "component": 2},
                      {"threshold": 0.99, "pairs": 1, "best": 1, "component": 1}]
    assert _dedup_rules.report_thresholds(0.8) == [0.8, 0.85, 0.9, 0.95]
    assert _dedup_rules.report_thresholds(0.8, [0.7, 0.9]) == [0.9]


def test_dedup_component_rule_and_report_beside_the_output(planted, found, tmp_path):
    result, out = found
    out_component = tmp_path / "component.tsv"
    component = dedup(planted["query"], planted["pool"], str(out_component),
                                 threshold=THRESHOLD, rule="component",
                                 report_thresholds=[THRESHOLD, 0.7, 0.9])
    assert set(result.pool_keys) <= set(component.pool_keys)
    assert component.confirmed == result.confirmed
    report = json.loads((tmp_path / "component.tsv.rules.json").read_text())
    assert report["rule"] == "component" and [r["threshold"] for r in report["thresholds"]] \
        == [THRESHOLD, 0.7, 0.9]
    first = report["thresholds"][0]
    assert first["best"] == len(set(result.pool_keys))
    assert first["component"] == len(set(component.pool_keys)) >= first["best"]
    assert "component" in str(component) and "rule=component" in component.lines()[0]
    assert json.loads((out.parent / (out.name + ".rules.json")).read_text())["rule"] == "best"


# -- stage 2: the images must be there ----------------------------------------------------------

def test_a_root_that_does_not_hold_the_keys_is_refused_before_the_search(planted, tmp_path,
                                                                          capsys, monkeypatch):
    """Before: every pair "unreadable", a near-empty exclude list, a warning and exit 0."""
    monkeypatch.setattr(_dedup_run, "search", lambda *a, **k: pytest.fail("searched first"))
    out = tmp_path / "dups.tsv"
    wrong = planted["base"] / "val"          # a real folder of images, not the pool's
    code = main(["dedup", "--query", planted["query"], "--pool", planted["pool"], "--pool-root",
                 str(wrong), "--out", str(out), *ONE_THREAD])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--pool-root {wrong} does not hold the images of the pool store" in err
    assert "64 of 64 sampled rows are not there" in err
    assert not out.exists()


def test_unreadable_images_are_listed_in_the_output_and_the_summary(planted, found, tmp_path):
    """Images gone or damaged after the stores were written: each is a failure of its own,
    named with why, in the summary and (as comments: still an exclude file) in the output."""
    import shutil

    result, _ = found
    root = tmp_path / "pool"
    shutil.copytree(planted["base"] / "pool", root)
    gone, broken = sorted(set(result.pool_keys))[:2]
    (root / gone).unlink()
    (root / broken).write_bytes(b"not a jpeg")
    out = tmp_path / "dups.tsv"
    again = dedup(planted["query"], planted["pool"], str(out), threshold=THRESHOLD,
                  pool_root=str(root), pool_batch=64, query_batch=16)
    assert again.unreadable_images == 2
    assert set(again.pool_keys) == set(result.pool_keys) - {gone, broken}
    text = out.read_text()
    assert f"# unreadable (its pairs are not confirmed): pool\t{gone}\tmissing\n" in text
    assert f"# unreadable (its pairs are not confirmed): pool\t{broken}\tcannot be decoded" \
        in text
    summary = str(again)
    assert "warning: 2 images could not be read, so" in summary
    assert f"pool {gone} (missing)" in summary and f"pool {broken} (cannot be decoded)" in summary
    report = json.loads((tmp_path / "dups.tsv.rules.json").read_text())
    assert {"role": "pool", "key": gone, "reason": "missing"} in report["unreadable"]
    keys, _ = _select_exclude(out)
    assert keys == set(again.pool_keys)       # the comments are not keys to exclude


def _select_exclude(path):
    from labelstore._select import read_exclude

    return read_exclude(str(path))


# -- stage 2: resume and torchrun -------------------------------------------------------------

def _dies_after(count: int, calls: list):
    """SIFT's inlier count that fails (as a killed run stops) after ``count`` pairs."""
    real = _dedup_sift.count_inliers

    def dies(*args, **kwargs):
        if len(calls) == count:
            raise RuntimeError("injected failure")
        calls.append(1)
        return real(*args, **kwargs)
    return dies


def test_killed_stage_two_resumes_from_the_progress_file(planted, found, tmp_path, monkeypatch):
    _, reference = found
    out = tmp_path / "resumed.tsv"
    options = dict(threshold=THRESHOLD, workers=1)
    real = _dedup_sift.count_inliers
    calls = []
    monkeypatch.setattr(_dedup_sift, "count_inliers", _dies_after(30, calls))
    with pytest.raises(RuntimeError, match="injected failure"):
        dedup(planted["query"], planted["pool"], str(out), **options)
    assert not out.exists()
    progress = tmp_path / "resumed.tsv.progress.0"
    recorded = progress.read_text().splitlines()
    assert recorded[0].startswith("# ssld dedup progress {") and 0 < len(recorded) - 1 <= 30
    with open(progress, "ab") as handle:   # the run died in the middle of a line
        handle.write(b"12\t3")

    calls.clear()
    monkeypatch.setattr(_dedup_sift, "count_inliers",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    result = dedup(planted["query"], planted["pool"], str(out), **options)
    assert result.resumed_pairs == len(recorded) - 1
    assert len(calls) == result.candidates - result.resumed_pairs     # only the rest
    assert out.read_text() == reference.read_text()
    assert not list(tmp_path.glob("resumed.tsv.progress*"))

    # a progress file of other stores is refused, not silently mixed in
    progress.write_text('# ssld dedup progress {"other": 1}\n0\t0\t50\t0\n')
    with pytest.raises(ValueError, match="other stores or stage-2 settings"):
        dedup(planted["query"], planted["pool"], str(out), **options)


def test_a_damaged_progress_file_is_one_line_naming_it(planted, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d.tsv"
    monkeypatch.setattr(_dedup_sift, "count_inliers", _dies_after(5, []))
    with pytest.raises(RuntimeError):
        dedup(planted["query"], planted["pool"], str(out), threshold=THRESHOLD, workers=1)
    monkeypatch.undo()
    progress = tmp_path / "d.tsv.progress.0"
    lines = progress.read_bytes().split(b"\n")
    lines[2] = b"7\tx\x00garbage"               # a complete line altered on disk
    progress.write_bytes(b"\n".join(lines))
    args = ["dedup", "--query", planted["query"], "--pool", planted["pool"], "--out", str(out),
            "--threshold", str(THRESHOLD), *ONE_THREAD]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"progress file {progress} line 3 is damaged" in err
    assert "delete it to start stage 2 afresh" in err
    progress.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)   # not a progress file at all
    assert main(args) == 2
    assert "does not start with the header dedup writes" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(planted, tmp_path):
    options = ["--threshold", str(THRESHOLD), "--top-m", "2", "--workers", "1",
               "--rule", "component", *ONE_THREAD]
    out_two = tmp_path / "two.tsv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "cli", "dedup", "--query", planted["query"], "--pool", planted["pool"],
         "--out", str(out_two), "--device", "cpu", *options],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compared ") == 1 and "on 2 ranks" in run.stdout
    out_one = tmp_path / "one.tsv"
    assert main(["dedup", "--query", planted["query"], "--pool", planted["pool"],
                 "--out", str(out_one), "--device", "cpu", *options]) == 0
    assert out_two.read_text() == out_one.read_text()
    assert len(out_one.read_text().splitlines()) > 20
    one, two = (json.loads((tmp_path / f"{n}.tsv.rules.json").read_text()) for n in ("one", "two"))
    assert one == two
    assert not list(tmp_path.glob("*.progress*"))
