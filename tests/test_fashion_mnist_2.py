"""experiments/fashion_mnist_2/run.py: the split, the gate's rule, the step graph.

Pure functions only: no ssld command runs here.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str, filename: str):
    """A study script imported once under ``name`` (they are scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "experiments" / "fashion_mnist_2" / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _driver():
    return _load("fashion_mnist_2_run", "run.py")


def _fake_data(per_class_labeled=40, per_class_pool=100, per_class_val=20):
    rng = random.Random(3)
    labeled = [(f"labeled/{c}/train_{c}_{i}.png", c) for c in range(10)
               for i in range(per_class_labeled)]
    pool_rows = [(f"pool/train_{c}_{i}.png", c) for c in range(10) for i in range(per_class_pool)]
    rng.shuffle(pool_rows)
    val = [(f"val/{c}/test_{c}_{i}.png", c) for c in range(10) for i in range(per_class_val)]
    return labeled, [(k, None) for k, _ in pool_rows], dict(pool_rows), val


def _scale(m, **over):
    base = dict(labeled_per_class=None, extra_per_class=30, pool_size=500, dev_per_class=4,
                val_per_class=None)
    return m.SCALES["smoke"].__class__(**(m.SCALES["smoke"].__dict__ | base | over))


def test_split_is_disjoint_and_T_contains_L():
    m = _driver()
    labeled, pool, hidden, val = _fake_data()
    sc = _scale(m)
    lists = m.make_split_lists(labeled, pool, hidden, val, sc)
    keys = {name: [k for k, _ in rows] for name, rows in lists.items()}
    for name, ks in keys.items():
        assert len(ks) == len(set(ks)), name
    L, T, U, V = (set(keys[x]) for x in ("L", "T", "U", "V"))
    assert L <= T and len(T) == len(L) + 10 * sc.extra_per_class
    assert not T & U and not T & V and not U & V
    assert len(U) == sc.pool_size
    assert set(keys["dev"]) <= L and set(keys["Ltrain"]) == L - set(keys["dev"])
    assert set(keys["Ttrain"]) == T - set(keys["dev"])
    # the pool is split into T's extras, U and the unused rest, nothing lost
    pool_keys = {k for k, _ in pool}
    assert (T - L) | U | set(keys["unused"]) == pool_keys
    assert not set(keys["unused"]) & (T | U)
    # T's extras are stratified and carry their (hidden in study 1) labels; U carries none
    extra = [(k, y) for k, y in lists["T"] if k not in L]
    assert all(hidden[k] == y for k, y in extra)
    assert sorted(y for _, y in extra) == sorted(list(range(10)) * sc.extra_per_class)
    assert all(y is None for _, y in lists["U"])
    assert all(hidden[k] == y for k, y in lists["U_hidden"])
    # deterministic
    assert m.make_split_lists(labeled, pool, hidden, val, sc) == lists


def test_L_and_dev_are_study_1s():
    """L, dev and Ltrain are drawn exactly as study 1's make_splits draws them."""
    m = _driver()
    labeled, pool, hidden, val = _fake_data()
    sc = _scale(m)
    lists = m.make_split_lists(labeled, pool, hidden, val, sc)
    rng = random.Random(m.DEV_SEED)
    L1 = m.per_class(labeled, None, rng)
    dev1 = m.per_class(L1, sc.dev_per_class, rng)
    assert lists["L"] == L1 and lists["dev"] == dev1


def test_plateau_rule():
    m = _driver()
    # +4 points from 3x to 9x with a small spread: not flattened
    rising = {1: [0.70, 0.71, 0.72], 3: [0.74, 0.75, 0.76], 9: [0.78, 0.79, 0.80]}
    r = m.plateau(rising, (1, 3, 9), 0.005)
    assert not r["flattened"]
    assert r["last_gain"] == pytest.approx(0.04)
    assert r["gains"]["1x->3x"] == pytest.approx(0.04)
    # +0.3 points: below the 0.5-point floor
    flat = {1: [0.70] * 3, 3: [0.80, 0.80, 0.80], 9: [0.803, 0.803, 0.803]}
    assert m.plateau(flat, (1, 3, 9), 0.005)["flattened"]
    # +1 point, but the seeds spread so much that its standard error is larger: flattened
    noisy = {1: [0.7] * 3, 3: [0.78, 0.80, 0.82], 9: [0.79, 0.81, 0.83]}
    r = m.plateau(noisy, (1, 3, 9), 0.005)
    assert r["last_gain_se"] == pytest.approx((2 * 0.02 ** 2 / 3) ** 0.5)
    assert r["bar"] == r["last_gain_se"] and r["flattened"]


def test_equal_epochs():
    m = _driver()
    assert m.equal_epochs(16, 6000, 6000) == 16
    assert m.equal_epochs(16, 6000, 16000) == 6
    assert m.equal_epochs(144, 6000, 16000) == 54
    assert m.equal_epochs(1, 300, 100000) == 1


@pytest.mark.parametrize("scale", ["smoke", "full"])
def test_steps_graph(scale, tmp_path):
    """Every dependency and every step the report's rows name exists; nothing after the gate
    runs before it; the steps curve does not wait for anything after the teacher."""
    m = _driver()
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.fm1.TEACHER,
                              student=m.fm1.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None)
    ctx = m.Context(args, m.SCALES[scale])
    steps = {s.name: s for s in m.build_steps(ctx)}
    order = list(steps)
    for name, step in steps.items():
        for dep in step.deps:
            assert dep in steps, (name, dep)
            assert order.index(dep) < order.index(name), (name, dep)
    for row in m.row_spec(ctx):
        for name in row["train_steps"] + row["eval_steps"]:
            assert name in steps, name

    def ancestors(name):
        seen, todo = set(), [name]
        while todo:
            for d in steps[todo.pop()].deps:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    assert "gate" not in ancestors("eval_ssld_L_x9_s2")
    assert "gate" in ancestors("eval_ssld_L+U_x9_s0") and "gate" in ancestors("dedup")
    assert "teacher_T_s0" not in ancestors("label_only_x9_s0")
    # equal steps: estimated student images depend on the budget only
    assert ctx.work_est["ssld_L+U_x3_s0"] == ctx.work_est["ssld_L_x3_s0"]
    sc = m.SCALES[scale]
    gate_inputs = [n for n in steps["gate"].deps]
    assert len(gate_inputs) == 2 * len(sc.multiples) * len(sc.seeds)


def _report():
    return _load("fashion_mnist_2_report", "report.py")


def test_report_recomputes_the_curve(tmp_path):
    """The curve table's cells are the mean and sample std of the finished seeds' top-1;
    a row with a seed missing says so, an unfinished budget shows '-'."""
    np = pytest.importorskip("numpy")
    m, rep = _driver(), _report()
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.fm1.TEACHER,
                              student=m.fm1.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None)
    sc = m.SCALES["full"]
    ctx = m.Context(args, sc)
    rows = m.row_spec(ctx)
    rng = random.Random(5)
    steps, top1 = {}, {}
    for row in rows:
        for tr, ev in zip(row["train_steps"], row["eval_steps"]):
            if row["group"] == "ssld_L+U_x9" and ev.endswith("_s2"):
                continue  # not finished: 2 of 3 seeds
            if row["group"].startswith("label_only_x9"):
                continue  # nothing finished at this budget
            top1[ev] = rng.uniform(0.7, 0.9)
            steps[ev] = {"done": True, "result": {"top1": top1[ev], "top5": 0.99}}
            steps[tr] = {"done": True, "wall_s": 60.0,
                         "result": {"steps": 736 * (row["multiple"] or 1), "epochs": 16,
                                    "train_seconds": 50.0}}
    data = {"scale": "full", "updated": "now", "scale_config": dataclasses.asdict(sc),
            "multiples": list(sc.multiples), "rows": rows, "steps": steps}
    md = rep.write_markdown(rep.Results(data), None)
    table = md.split("### The steps curve", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines()[2:]}
    for kind, label in rep.CURVE:
        for i, mult in enumerate(sc.multiples):
            vals = [top1[f"eval_{kind}_x{mult}_s{s}"] for s in sc.seeds
                    if f"eval_{kind}_x{mult}_s{s}" in top1]
            cell = cells[label][i]
            if not vals:
                assert cell == "-"
                continue
            mean, std = 100 * np.mean(vals), 100 * np.std(vals, ddof=1)
            assert cell.startswith(f"{mean:.2f} ± {std:.2f}"), (label, mult, cell)
            assert cell.endswith(f"({len(vals)})" if len(vals) == 3 else f"({len(vals)}/3)")
    assert "2/3" in cells["SSLD on L + selected U"][2]
