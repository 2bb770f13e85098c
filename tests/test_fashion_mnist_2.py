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
    return _load("fashion_mnist_2_report", "report.py")


def _full_rows(m, tmp_path):
    """The full scale and the report's rows of study 2's driver ``m``."""
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.fm1.TEACHER,
                              student=m.fm1.STUDENT, ssld="ssld", device="cpu", num_workers=0,
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


# -- resuming from the results file (experiments/fashion_mnist/record.py) ----------------------

# what sitting 1 recorded as finished (results/full.json at commit 983d51e)
SITTING_1 = ("prepare", "splits", "tune_label_only_0", "tune_label_only_1", "tune_label_only_2",
             "tune_label_only_3", "choose_tune_label_only", "tune_teacher_0", "tune_teacher_1",
             "choose_tune_teacher", "teacher_T_s0", "eval_teacher_T_s0", "infer_dev",
             "inspect_dev_Ltrain", "tune_ssld_0", "tune_ssld_1", "tune_ssld_2", "tune_ssld_3",
             "choose_tune_ssld", "infer_L", "inspect_L", "ssld_L_x9_s0", "eval_ssld_L_x9_s0",
             "ssld_L_x9_s1", "eval_ssld_L_x9_s1", "eval_teacher_T_s0_on_U")


def _full_graph(tmp_path):
    m = _driver()
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher=m.fm1.TEACHER,
                              student=m.fm1.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None)
    steps = m.build_steps(m.Context(args, m.SCALES["full"]))
    return m.fm1.record, {s.name: s for s in steps}


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


def test_recomputed_results_are_compared_exactly_where_they_must_repeat():
    rec = _driver().fm1.record
    # sitting 1 parsed "88.62%" (0.8862000000000001); eval --json gives the fraction
    old = {"top1": 0.8862000000000001, "top5": 0.9975, "images": 10000, "data": "V"}
    new = {"top1": 0.8862, "top5": 0.9975, "images": 10000, "top1_correct": 8862,
           "top5_correct": 9975, "data": "V"}
    assert rec.differences(old, new, "eval") == []
    assert rec.differences(old, new | {"top1": 0.8861, "top1_correct": 8861}, "eval") == \
        ["top1_percent: recorded '88.62', now '88.61'"]
    # sitting 1's "99.81%" on 30,000 images is 29,942 or 29,943 correct: both reproduce it
    on_u = {"top1": 0.8904000000000001, "top5": 0.9981, "images": 30000}
    assert rec.differences(on_u, {"top1": 0.8904, "top5": 29942 / 30000, "images": 30000,
                                  "top1_correct": 26712, "top5_correct": 29942}, "eval") == []
    # records with counts (eval --json) are compared by count, exactly
    assert rec.differences(new, new | {"top5": 0.9974, "top5_correct": 9974}, "eval") == \
        ["top5_correct: recorded 9975, now 9974"]
    # a store: its statistics (and, from now on, fingerprints) repeat; bytes on disk and paths
    # need not (the store format's checksums changed them)
    store = {"path": "/a/L.zarr", "rows": 6000, "mean_top1_prob": 0.8106748250325521,
             "top1_counts": {"min": 502.0, "median": 601.0}, "bytes_on_disk": 620456}
    again = store | {"path": "/b/L.zarr", "bytes_on_disk": 650000,
                     "top1_counts": {"min": 502, "median": 601},
                     "label_sha256": {"probs": "ab"}}
    assert rec.differences(store, again, "inspect") == []
    assert rec.differences(store, again | {"mean_top1_prob": 0.8106748250325522}, "inspect")
    assert rec.differences(store, again | {"top1_counts": {"min": 503, "median": 601}},
                           "inspect") == ["top1_counts.min: recorded 502.0, now 503"]
    # the median was numpy's (a float) until 32bd51a, the lower middle count (an int) since:
    # sitting 1 recorded 601.0 for counts whose lower median is 597
    assert rec.differences(store, again | {"top1_counts": {"min": 502, "median": 597}},
                           "inspect") == []
    lower = store | {"top1_counts": {"min": 502, "median": 597}}
    assert rec.differences(lower, again | {"top1_counts": {"min": 502, "median": 598}},
                           "inspect") == ["top1_counts.median: recorded 597, now 598"]
    train = {"last_train_loss": 0.902409, "train_seconds": 868.4, "steps": 1870,
             "run_dir": "/work/fm2/full/runs/teacher_T_s0"}
    assert rec.differences(train, train | {"train_seconds": 500.0, "run_dir": "/x"}) == []
    assert rec.differences(train, train | {"last_train_loss": 0.902410})
    assert rec.merged(store, again)["label_sha256"] == {"probs": "ab"}
    assert rec.merged(store, again)["path"] == "/a/L.zarr"


def test_commands_compare_without_location_and_output_format(tmp_path):
    """Sitting 1's eval command (no --json, another workdir, another ssld) is the command the
    driver builds now; a changed hyper-parameter is not."""
    rec, steps = _full_graph(tmp_path / "w")
    m = _driver()
    recorded = ("/work/venv/bin/ssld eval --model resnet10t --checkpoint "
                "/work/fm2/full/runs/teacher_T_s0/last.pt --data /work/fm2/full/splits/V.txt "
                "--root /work/fm2/full/data/images --batch-size 256 --device cpu "
                "--num-workers 0")
    args = argparse.Namespace(workdir=str(tmp_path / "w"), data=None, teacher=m.fm1.TEACHER,
                              student=m.fm1.STUDENT, ssld="/elsewhere/ssld", device="cpu",
                              num_workers=2, src=None)
    ctx = m.Context(args, m.SCALES["full"])
    now = steps["eval_teacher_T_s0"].command(ctx)
    assert "--json" in now
    work = str(ctx.work)
    assert rec.comparable(now, work, str(ctx.data)) == \
        rec.comparable(recorded, "/work/fm2/full", "/work/fm2/full/data")
    other = recorded.replace("--batch-size 256", "--batch-size 128")
    assert rec.comparable(now, work) != rec.comparable(other, "/work/fm2/full")
    sitting_1 = {"threads": 1, "device": "cpu", "scale": "full"}
    assert rec.settings_differences(sitting_1, sitting_1 | {"environment": {"torch": "2"}}) == []
    assert rec.settings_differences(sitting_1, sitting_1 | {"threads": 2}) == \
        ["threads: recorded 1, now 2"]
    versioned = sitting_1 | {"environment": {"torch": "2.14.1"}}
    assert rec.settings_differences(versioned, sitting_1 | {"environment": {"torch": "2.15"}})


class _Toy:
    """A four-step protocol of internal steps, so the driver runs without ssld: the data, a
    teacher, its evaluation, its store and the store's inspect, two students of the store and
    their evaluations, a tuning run and its choice. ``calls`` counts runs per step."""

    def __init__(self, tmp_path, teacher_loss=0.5):
        self.m, self.calls, self.loss = _driver(), {}, teacher_loss
        self.fail_once: set[str] = set()
        self.tmp = tmp_path

    def prepare(self):
        (self.workdir / "prepared").write_text("data")
        return {"n": 100}

    def teacher(self):
        if not (self.workdir / "prepared").exists():
            raise RuntimeError("the teacher started before its data existed")
        return {"last_train_loss": self.loss}

    def step(self, name, kind, deps=(), value=None):
        def internal(ctx, name=name, value=value):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.fail_once:  # e.g. the sitting ended while it ran
                self.fail_once.discard(name)
                raise RuntimeError(f"{name} was stopped")
            return dict(value() if callable(value) else (value or {"ok": 1}))
        return self.m.Step(name, kind, deps=deps, internal=internal)

    def steps(self):
        s = self.step
        return [s("prepare", "prepare", value=self.prepare),
                s("tune", "train", ("prepare",), {"dev_top1": 0.7}),
                s("choose", "choose", ("tune",)),
                s("teacher", "train", ("choose",), self.teacher),
                s("eval_teacher", "eval", ("teacher",),
                  lambda: {"top1": 0.9 if self.loss == 0.5 else 0.8, "images": 100}),
                s("store", "infer", ("teacher",)),
                s("inspect_store", "inspect", ("store",),
                  lambda: {"mean_top1_prob": self.loss}),
                s("student_a", "train", ("choose", "inspect_store"), {"last_train_loss": 1.0}),
                s("eval_student_a", "eval", ("student_a",), {"top1": 0.8, "images": 100}),
                s("student_b", "train", ("choose", "inspect_store"), {"last_train_loss": 1.1}),
                s("eval_student_b", "eval", ("student_b",), {"top1": 0.81, "images": 100})]

    def run(self, workdir, results, discard=False, only=None):
        m = self.m
        args = argparse.Namespace(
            workdir=str(self.tmp / workdir), data=None, teacher="t", student="s", ssld="ssld",
            device="cpu", num_workers=0, src=None, jobs=1, threads=1, scale="smoke",
            results=str(self.tmp / results), discard_unreproduced=discard)
        ctx = m.Context(args, m.SCALES["smoke"])
        self.workdir = ctx.work
        ctx.work.mkdir(parents=True, exist_ok=True)
        # the teacher comes before the data in the step list, as a reused choice lets it
        steps = self.steps()
        steps.insert(0, steps.pop([s.name for s in steps].index("tune")))
        steps.insert(1, steps.pop([s.name for s in steps].index("choose")))
        steps.insert(2, steps.pop([s.name for s in steps].index("teacher")))
        driver = m.fm1.Driver(ctx, steps, rows=lambda c: [], study="toy")
        self.calls = {}
        return driver.run(only), m.fm1.read_json(self.tmp / results)


def _sitting_1_of_toy(tmp_path):
    """A first sitting that finished everything but student_b's evaluation and whose workdir
    is then lost."""
    toy = _Toy(tmp_path)
    code, data = toy.run("w1", "results.json")
    assert code == 0 and all(v["done"] for v in data["steps"].values())
    data["steps"]["eval_student_b"].update(done=False, result=None)
    data["steps"]["student_b"].update(done=False, result=None)
    (tmp_path / "results.json").write_text(__import__("json").dumps(data))
    return toy


def test_a_new_workdir_resumes_from_the_results_file(tmp_path):
    toy = _sitting_1_of_toy(tmp_path)
    code, data = toy.run("w2", "results.json")
    assert code == 0
    # recomputed: what student_b reads (teacher -> store) and its checks; run: student_b
    assert set(toy.calls) == {"prepare", "teacher", "eval_teacher", "store", "inspect_store",
                              "student_b", "eval_student_b"}
    steps = data["steps"]
    assert steps["teacher"]["recomputed"][-1]["reproduced"] is True
    assert steps["student_a"]["done"] and "recomputed" not in steps["student_a"]
    assert steps["eval_student_b"]["done"] and "discarded" not in data
    # a third sitting finds everything recorded: nothing runs
    code, data = toy.run("w3", "results.json")
    assert code == 0 and toy.calls == {}


def test_a_restart_in_the_same_workdir_still_checks_what_was_recomputed(tmp_path):
    """The driver stopped after the teacher was recomputed here but before its evaluation:
    started again, it evaluates the teacher and compares, instead of taking the record."""
    toy = _sitting_1_of_toy(tmp_path)
    toy.fail_once = {"eval_teacher"}
    code, _ = toy.run("w2", "results.json")
    assert code == 1 and "teacher" in toy.calls
    code, data = toy.run("w2", "results.json")
    assert code == 0 and "eval_teacher" in toy.calls and "teacher" not in toy.calls
    assert data["steps"]["eval_teacher"]["recomputed"][-1]["reproduced"] is True


def test_an_unreproduced_teacher_stops_its_dependents_and_keeps_the_record(tmp_path):
    toy = _sitting_1_of_toy(tmp_path)
    toy.loss = 0.6  # the recomputed teacher trains to another loss
    code, data = toy.run("w2", "results.json")
    assert code == 1
    assert "student_b" not in toy.calls and "store" not in toy.calls
    teacher = data["steps"]["teacher"]
    assert teacher["result"] == {"last_train_loss": 0.5}  # the record is kept as it was
    note = teacher["recomputed"][-1]
    assert note["reproduced"] is False and note["result"] == {"last_train_loss": 0.6}
    assert data["steps"]["student_a"]["done"] and "discarded" not in data


def test_a_failed_teacher_does_not_block_steps_that_read_only_finished_results(tmp_path):
    """Study 2's amendment 1b: the recorded teacher does not reproduce on a new machine, and a
    step that reads only recorded results below it (the curve's evaluations) still runs, with
    a second teacher after it; what reads the failed teacher's outputs waits."""
    toy = _sitting_1_of_toy(tmp_path)
    toy.loss = 0.6
    base = toy.steps
    toy.steps = lambda: base() + [toy.step("summary", "choose", ("eval_student_a",)),
                                  toy.step("teacher2", "train", ("summary",))]
    code, data = toy.run("w2", "results.json")
    assert code == 1  # the teacher's check failed
    assert {"summary", "teacher2"} <= set(toy.calls)
    assert "student_b" not in toy.calls and "store" not in toy.calls
    assert data["steps"]["teacher2"]["done"] and "discarded" not in data


def test_a_recorded_failure_stays_in_the_results_until_the_step_runs_again(tmp_path):
    """Study 2's gate failed in sitting 2; a later sitting that runs other steps only
    (--only) in a new workdir must keep that outcome in the results file, not write it as a
    step that never ran."""
    toy = _Toy(tmp_path)
    base = toy.steps

    flat = []

    def gate():
        if not flat:
            raise RuntimeError("not flattened")
        return {"flat": True}
    toy.steps = lambda: base() + [toy.step("gate", "choose", ("eval_student_a",), gate)]
    code, data = toy.run("w1", "results.json")
    assert code == 1 and data["steps"]["gate"]["error"] == "RuntimeError: not flattened"
    recorded = data["steps"]["gate"]
    code, data = toy.run("w2", "results.json", only={"eval_student_b"})
    assert code == 0 and "gate" not in toy.calls
    assert data["steps"]["gate"] == recorded
    # run again, the step's new outcome replaces the old one
    flat.append(True)
    code, data = toy.run("w3", "results.json")
    assert code == 0 and toy.calls.get("gate") == 1
    assert data["steps"]["gate"]["done"] and data["steps"]["gate"]["error"] is None
    assert data["steps"]["gate"]["result"] == {"flat": True}


def test_discard_unreproduced_moves_the_dependent_records_and_measures_them_again(tmp_path):
    toy = _sitting_1_of_toy(tmp_path)
    toy.loss = 0.6
    code, data = toy.run("w2", "results.json", discard=True)
    assert code == 0
    assert {"student_a", "eval_student_a", "student_b"} <= set(toy.calls)
    assert "tune" not in toy.calls  # does not depend on the teacher: kept
    assert data["steps"]["teacher"]["result"] == {"last_train_loss": 0.6}
    assert data["steps"]["eval_teacher"]["result"]["top1"] == 0.8
    gone = data["discarded"]
    assert {"teacher", "eval_teacher", "store", "inspect_store", "student_a",
            "eval_student_a"} <= set(gone)
    assert "tune" not in gone and "choose" not in gone
    assert gone["eval_student_a"][0]["result"]["top1"] == 0.8
    assert "does not reproduce" in gone["teacher"][0]["discarded"]["reason"]
    assert gone["student_a"][0]["discarded"]["reason"].startswith("depends on teacher")


# -- the driver reads JSON, not printed text (issue 11, point 5) -----------------------------

def test_eval_and_dedup_results_come_from_the_commands_json(tmp_path):
    fm1 = _driver().fm1
    out = tmp_path / "eval.out"
    out.write_text('{"model": "m", "checkpoint": "c", "data": "d", "top1": 0.8862, '
                   '"top5": 0.9975, "images": 10000, "seconds": 3.0, "images_per_s": 3000}\n')
    assert fm1.read_eval(out) == {"top1": 0.8862, "top5": 0.9975, "images": 10000,
                                  "top1_correct": 8862, "top5_correct": 9975}
    dups = tmp_path / "U_vs_V.dups"
    dups.write_text("# ssld dedup: query=/a/V.zarr pool=/a/U.zarr threshold=0.9\n"
                    "# pool_key\tquery_key\tcosine\tinliers\n"
                    "pool/1.png\tval/1.png\t0.9900\t40\npool/1.png\tval/2.png\t0.9500\t30\n"
                    "pool/3.png\tval/3.png\t0.9300\t25\n")
    (tmp_path / "U_vs_V.dups.rules.json").write_text(
        '{"query": "/a/V.zarr", "pool": "/a/U.zarr", "threshold": 0.9, "verify": "sift", '
        '"min_inliers": 20, "rule": "best", "candidates": 7, "confirmed": 3, '
        '"excluded_pool_images": 2, "thresholds": []}')
    counted = fm1.count_dups(None, dups)
    assert counted["pairs"] == 3 and counted["pool_images"] == 2 and counted["val_images"] == 3
    assert counted["candidates"] == 7 and counted["confirmed"] == 3
    assert counted["excluded_pool_images"] == 2
    # the hash is of the pairs, not of the header that names the stores' paths
    moved = tmp_path / "moved.dups"
    moved.write_text(dups.read_text().replace("/a/", "/b/"))
    (tmp_path / "moved.dups.rules.json").write_text(
        (tmp_path / "U_vs_V.dups.rules.json").read_text())
    assert fm1.count_dups(None, moved)["sha256"] == counted["sha256"]


def test_checks_then_evaluations_then_interrupted_runs_start_first(tmp_path):
    m = _driver()
    args = argparse.Namespace(workdir=str(tmp_path), data=None, teacher="t", student="s",
                              ssld="ssld", device="cpu", num_workers=0, src=None, jobs=1,
                              threads=1, scale="smoke", results=str(tmp_path / "r.json"))
    ctx = m.Context(args, m.SCALES["smoke"])
    steps = [m.Step(n, "train", resumable_train=Path(n)) for n in ("a", "b", "c")]
    steps.append(m.Step("eval_x", "eval"))
    driver = m.fm1.Driver(ctx, steps, rows=lambda c: [], study="toy")
    (ctx.run_dir("c")).mkdir(parents=True)
    (ctx.run_dir("c") / "last.pt").write_bytes(b"")
    driver.expected["b"] = {}
    assert sorted(["a", "b", "c", "eval_x"], key=driver.urgency) == ["b", "eval_x", "c", "a"]


def test_a_run_that_finished_while_no_driver_watched_is_collected_not_resumed(tmp_path):
    """A driver that dies leaves its train-student processes running; one that reaches its last
    epoch then must be collected by the next driver, not resumed (--resume refuses a finished
    run: exit status 2 in ssld, 3 in this stand-in)."""
    import sys

    m = _driver()
    args = argparse.Namespace(
        workdir=str(tmp_path / "w"), data=None, teacher="t", student="s", ssld="ssld",
        device="cpu", num_workers=0, src=None, jobs=1, threads=1, scale="smoke",
        results=str(tmp_path / "results.json"), discard_unreproduced=False)
    ctx = m.Context(args, m.SCALES["smoke"])
    ctx.work.mkdir(parents=True)
    run_dir = ctx.run_dir("r")
    script = (f"import pathlib, sys; d = pathlib.Path({str(run_dir)!r}); "
              "d.mkdir(parents=True, exist_ok=True); (d / 'last.pt').write_text('x'); "
              "sys.exit(3 if '--resume' in sys.argv else 0)")

    def collect(c):
        if not (run_dir / "finished").exists():
            raise RuntimeError("metrics.csv does not reach the last epoch")
        return {"epochs": 1}

    def driver():
        step = m.Step("r", "train", command=lambda c: [sys.executable, "-c", script],
                      collect=collect, outputs=lambda c: [run_dir / "last.pt"],
                      resumable_train=Path("r"))
        return m.fm1.Driver(ctx, [step], rows=lambda c: [], study="toy")

    assert driver().run() == 1          # the driver "died" before the run's last epoch
    (run_dir / "finished").write_text("")   # the orphaned run then finished
    assert driver().run() == 0
    assert m.fm1.read_json(tmp_path / "results.json")["steps"]["r"]["result"] == {"epochs": 1}
