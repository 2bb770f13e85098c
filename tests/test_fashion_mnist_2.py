"""experiments/fashion_mnist_2/run.py: the split, the gate's rule, the step graph, its report,
and how its committed record resumes (the driver itself: tests/test_study_driver.py).

Pure functions only: no ssld command runs here.
"""
from __future__ import annotations

import argparse
import dataclasses
import random

import pytest

from experiments import record
from experiments.driver import ancestors as driver_ancestors
from experiments.driver import check_graph
from experiments.fashion_mnist_2 import report as study2_report
from experiments.fashion_mnist_2 import run as study2


def _driver():
    return study2


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
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.TEACHER,
                              student=m.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None)
    ctx = m.Context(args, m.SCALES[scale])
    steps = {s.name: s for s in m.build_steps(ctx)}
    order = list(steps)
    assert check_graph(list(steps.values()), m.row_spec(ctx)) == []

    def ancestors(name):
        return driver_ancestors(steps, name)

    assert "gate" not in ancestors("eval_ssld_L_x9_s2")
    assert "gate" in ancestors("eval_ssld_L+U_x9_s0") and "gate" in ancestors("eval_ssld_L+U_x1_s0")
    for side in ("ssld_L+U_all_x3_s0", "teacher_L_s0", "ssld_L+U_bridge_x3_s0"):
        assert "gate" in ancestors(side), side
    # amendment 4: the teacher table needs no plateau, only the finished curve
    for side in ("teacher_Tshort_s0", "ssld_L_tshort_x3_s0"):
        assert "gate" not in ancestors(side) and "curve" in ancestors(side), side
    sc = m.SCALES[scale]
    # amendment 1: the defaults rows wait for the finished curve, not the gate; 1b: those
    # that read a teacher read T3 (recomputed in sitting 3), as do their tuned counterparts
    assert set(steps["curve"].deps) == set(steps["gate"].deps)
    for name in ("dedup3", "ssld_L3_x3_s2", "ssld_L3+U_x3_s2", "ssld_L3_v1_x3_s0",
                 "ssld_L3_default_x3_s1", "ssld_L3+U_default_x1_s0", "label_only_default_x3_s0"):
        assert "gate" not in ancestors(name) and "curve" in ancestors(name), name
    for name in ("ssld_L3_x3_s0", "ssld_L3+U_default_x3_s0", f"select_U3_v1_top{sc.k_main}"):
        assert "teacher_T3_s0" in ancestors(name), name
        direct = set(steps[name].deps)  # the stores it reads (the curve's ancestors aside)
        assert not direct & {"inspect_L", "inspect_U", "dedup", "inspect_L+U_top1000"}, name
    select3 = " ".join(map(str, steps[f"select_U3_v1_top{sc.k_main}"].command(ctx)))
    assert "--exclude" in select3 and "U3_vs_V3.dups" in select3
    # the rows on L come before U's pipeline (list order: they start first)
    assert order.index("ssld_L3_default_x3_s1") < order.index("infer_U3")
    assert "ssld_L3_default_x3_s2" not in steps  # amendment 2: the old default, 2 seeds
    # equal steps: estimated student images depend on the budget only
    assert ctx.work_est["ssld_L+U_x3_s0"] == ctx.work_est["ssld_L_x3_s0"]
    sc = m.SCALES[scale]
    gate_inputs = [n for n in steps["gate"].deps]
    assert len(gate_inputs) == 2 * len(sc.multiples) * len(sc.seeds)


def _report():
    return study2_report


def _full_rows(m, tmp_path):
    """The full scale and the report's rows of study 2's driver ``m``."""
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.TEACHER,
                              student=m.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None)
    sc = m.SCALES["full"]
    return sc, m.row_spec(m.Context(args, sc))


def test_report_recomputes_the_curve(tmp_path):
    """The curve table's cells are the mean and sample std of the finished seeds' top-1;
    a row with a seed missing says so, an unfinished budget shows '-'."""
    np = pytest.importorskip("numpy")
    m, rep = _driver(), _report()
    sc, rows = _full_rows(m, tmp_path)
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


def test_report_plots_t3s_pair_from_its_finished_seeds(tmp_path):
    """The plot's L vs L + U pair from teacher T3 is the mean and sample std of the finished
    seeds at the steps the runs recorded; a row with no finished seed is left out."""
    np = pytest.importorskip("numpy")
    m, rep = _driver(), _report()
    sc, rows = _full_rows(m, tmp_path)
    by_group = {row["group"]: row for row in rows}
    rng = random.Random(7)
    steps, top1 = {}, {"ssld_L3_x3": [], "ssld_L3+U_x3": []}
    for group in top1:
        row = by_group[group]
        for tr, ev in zip(row["train_steps"], row["eval_steps"]):
            if group == "ssld_L3+U_x3" and ev.endswith("_s2"):
                continue  # 2 of 3 seeds finished
            top1[group].append(rng.uniform(0.7, 0.9))
            steps[ev] = {"done": True, "result": {"top1": top1[group][-1], "top5": 0.99}}
            steps[tr] = {"done": True, "wall_s": 60.0,
                         "result": {"steps": 2208, "epochs": 48, "train_seconds": 50.0}}
    data = {"scale": "full", "updated": "now", "scale_config": dataclasses.asdict(sc),
            "multiples": list(sc.multiples), "rows": rows, "steps": steps}
    points = rep.t3_points(rep.Results(data))
    assert [p[0].split(" (")[0] for p in points] == [label for _, label, _ in rep.T3_PAIR]
    for (label, _, n_steps, mean, std), (group, _, _) in zip(points, rep.T3_PAIR):
        vals = top1[group]
        assert n_steps == 2208
        assert mean == pytest.approx(100 * np.mean(vals))
        assert std == pytest.approx(100 * np.std(vals, ddof=1))
        assert label.endswith(f"(3×, {len(vals)} seeds)" if len(vals) == 3 else
                              f"(3×, {len(vals)}/3 seeds)")
    del data["steps"]["eval_ssld_L3_x3_s0"], data["steps"]["eval_ssld_L3_x3_s1"], \
        data["steps"]["eval_ssld_L3_x3_s2"]
    assert [p[0].split(" (")[0] for p in rep.t3_points(rep.Results(data))] == \
        ["SSLD on L + selected U, teacher T3"]


# -- resuming study 2 from its results file (experiments/record.py) ---------------------------

# what sitting 1 recorded as finished (results/full.json at commit 983d51e)
SITTING_1 = ("prepare", "splits", "tune_label_only_0", "tune_label_only_1", "tune_label_only_2",
             "tune_label_only_3", "choose_tune_label_only", "tune_teacher_0", "tune_teacher_1",
             "choose_tune_teacher", "teacher_T_s0", "eval_teacher_T_s0", "infer_dev",
             "inspect_dev_Ltrain", "tune_ssld_0", "tune_ssld_1", "tune_ssld_2", "tune_ssld_3",
             "choose_tune_ssld", "infer_L", "inspect_L", "ssld_L_x9_s0", "eval_ssld_L_x9_s0",
             "ssld_L_x9_s1", "eval_ssld_L_x9_s1", "eval_teacher_T_s0_on_U")


def _full_graph(tmp_path):
    m = _driver()
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.TEACHER,
                              student=m.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None)
    steps = m.build_steps(m.Context(args, m.SCALES["full"]))
    return record, {s.name: s for s in steps}


def _plan(rec, steps, recorded, done_here=()):
    return rec.plan(deps={n: s.deps for n, s in steps.items()},
                    kinds={n: s.kind for n, s in steps.items()},
                    has_command={n: s.command is not None for n, s in steps.items()},
                    recorded=recorded, done_here=done_here, wanted=set(steps))


def test_a_fresh_machine_recomputes_only_what_pending_steps_read(tmp_path):
    """Sitting 1's record on an empty workdir: the tuning runs and the finished curve rows
    are numbers and are reused; the teacher, its store and the data are recomputed because
    the pending curve rows read them, and so are their checks (the teacher's evaluations,
    the store's inspect); nothing reads the tuning teacher's store any more."""
    rec, steps = _full_graph(tmp_path)
    plan = _plan(rec, steps, SITTING_1)
    assert plan.recompute == {"prepare", "splits", "teacher_T_s0", "eval_teacher_T_s0",
                              "eval_teacher_T_s0_on_U", "infer_L", "inspect_L"}
    assert {"tune_teacher_1", "infer_dev", "inspect_dev_Ltrain", "tune_ssld_3",
            "choose_tune_ssld", "ssld_L_x9_s0", "eval_ssld_L_x9_s1"} <= plan.reused
    assert plan.reused | plan.recompute == set(SITTING_1)
    assert "ssld_L_x9_s2" in plan.pending and "label_only_x1_s0" in plan.pending
    # the teacher's declared inputs are reused at once (its lr's choice): it must still wait
    # for the recomputed data, as must every step that reads files, but not a choice
    extra = rec.base_deps(plan, deps={n: s.deps for n, s in steps.items()},
                          kinds={n: s.kind for n, s in steps.items()},
                          has_command={n: s.command is not None for n, s in steps.items()})
    assert {"prepare", "splits"} <= set(extra["teacher_T_s0"])
    assert {"prepare", "splits"} <= set(extra["label_only_x9_s0"])
    assert "choose_tune_ssld" not in extra and "gate" not in extra and "splits" not in extra
    # the same workdir kept (its steps finished here): nothing recorded is recomputed
    kept = _plan(rec, steps, SITTING_1, done_here=SITTING_1)
    assert not kept.recompute and not kept.reused
    # restarted after the teacher was recomputed here: its unfinished check still runs
    here = {"prepare", "splits", "teacher_T_s0", "eval_teacher_T_s0", "infer_L"}
    restarted = rec.plan(deps={n: s.deps for n, s in steps.items()},
                         kinds={n: s.kind for n, s in steps.items()},
                         has_command={n: s.command is not None for n, s in steps.items()},
                         recorded=SITTING_1, done_here=here, wanted=set(steps),
                         recomputed_here=here)
    assert restarted.recompute == {"eval_teacher_T_s0_on_U", "inspect_L"}
    # everything recorded: nothing runs, nothing is recomputed
    everything = _plan(rec, steps, set(steps))
    assert not everything.recompute and not everything.pending
    # only the evaluation of a finished run is missing: its checkpoint is recomputed, not
    # the run's inputs beyond it
    most = set(SITTING_1) - {"eval_ssld_L_x9_s1"}
    plan = _plan(rec, steps, most)
    assert "ssld_L_x9_s1" in plan.recompute and "eval_ssld_L_x9_s1" in plan.pending


def test_commands_compare_without_location_and_output_format(tmp_path):
    """Sitting 1's eval command (no --json, another workdir, another ssld) is the command the
    driver builds now; a changed hyper-parameter is not."""
    rec, steps = _full_graph(tmp_path / "w")
    m = _driver()
    recorded = ("/work/venv/bin/ssld eval --model resnet10t --checkpoint "
                "/work/fm2/full/runs/teacher_T_s0/last.pt --data /work/fm2/full/splits/V.txt "
                "--root /work/fm2/full/data/images --batch-size 256 --device cpu "
                "--num-workers 0")
    args = argparse.Namespace(workdir=str(tmp_path / "w"), data=None, teacher=m.TEACHER,
                              student=m.STUDENT, ssld="/elsewhere/ssld", device="cpu",
                              num_workers=2, src=None)
    ctx = m.Context(args, m.SCALES["full"])
    now = steps["eval_teacher_T_s0"].command(ctx)
    assert "--json" in now
    work = str(ctx.work)
    assert rec.comparable(now, work, str(ctx.data)) == \
        rec.comparable(recorded, "/work/fm2/full", "/work/fm2/full/data")
    other = recorded.replace("--batch-size 256", "--batch-size 128")
    assert rec.comparable(now, work) != rec.comparable(other, "/work/fm2/full")
