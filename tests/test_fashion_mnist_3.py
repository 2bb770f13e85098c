"""experiments/fashion_mnist_3/run.py: its splits (study 2's), the step graph and the commands
built from the choices, the reading rules and the budget rule, and its report on a fake
results file (the driver itself: tests/test_study_driver.py).

Pure functions only: no ssld command runs here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics

import pytest

from experiments import record
from experiments.driver import Context, ancestors, check_graph, write_json
from experiments.fashion_mnist_2 import run as study2
from experiments.fashion_mnist_3 import report as rep
from experiments.fashion_mnist_3 import run as m
from experiments.results import Results
from experiments.steps import read_list


def _ctx(tmp_path, scale="full", **over):
    args = argparse.Namespace(workdir=str(tmp_path / "w"), data=None, teacher=m.TEACHER,
                              student=m.STUDENT, ssld="ssld", device="cpu", num_workers=0,
                              src=None, scale=scale, results=str(tmp_path / "results.json"),
                              jobs=2, rates=None)
    for key, value in over.items():
        setattr(args, key, value)
    return Context(args, m.SCALES[scale])


def _steps(ctx):
    return {s.name: s for s in m.build_steps(ctx)}


# -- the data: study 2's splits ---------------------------------------------------------------


def test_the_splits_are_study_2s_and_are_written(tmp_path):
    """The split step is study 2's, on the same sizes; its list files are written (through
    steps.write_list) and hold make_split_lists' rows."""
    for field in ("labeled_per_class", "extra_per_class", "pool_size", "dev_per_class",
                  "val_per_class"):
        assert getattr(m.SCALES["full"], field) == getattr(study2.SCALES["full"], field)
    rng = random.Random(1)
    labeled = [(f"labeled/{c}/l{c}_{i}.png", c) for c in range(10) for i in range(40)]
    pool = [(f"pool/p{c}_{i}.png", c) for c in range(10) for i in range(120)]
    rng.shuffle(pool)
    val = [(f"val/{c}/v{c}_{i}.png", c) for c in range(10) for i in range(60)]
    ctx = _ctx(tmp_path, "smoke")
    ctx.data.mkdir(parents=True)
    for name, rows in (("labeled", labeled), ("pool", [(k, None) for k, _ in pool]),
                       ("pool_labels", pool), ("val", val)):
        (ctx.data / f"{name}.txt").write_text(
            "".join(f"{k} {y}\n" if y is not None else f"{k}\n" for k, y in rows))
    steps = _steps(ctx)
    result = steps["splits"].internal(ctx)
    expected = study2.make_split_lists(labeled, [(k, None) for k, _ in pool], dict(pool), val,
                                       ctx.scale)
    for name, rows in expected.items():
        assert read_list(ctx.splits / f"{name}.txt") == rows, name
        assert result[name] == len(rows)
        assert result["sha256"][name] == record.sha256_of(ctx.splits / f"{name}.txt")


def _study2_hashes():
    steps = json.loads(m.STUDY2_RESULTS.read_text())["steps"]
    return steps["prepare"]["result"]["sha256"], steps["splits"]["result"]["sha256"]


def test_check_splits_stops_the_study_on_other_list_files(tmp_path):
    prepared, splits = _study2_hashes()
    ctx = _ctx(tmp_path)
    ctx.results = {"prepare": {"sha256": dict(prepared)}, "splits": {"sha256": dict(splits)}}
    assert m.check_splits(ctx)["equal"]
    ctx.results["splits"]["sha256"]["U"] = "0" * 64
    with pytest.raises(RuntimeError, match="U differ from study 2's"):
        m.check_splits(ctx)
    smoke = _ctx(tmp_path, "smoke")
    smoke.results = {"prepare": {"sha256": {}}, "splits": {"sha256": {}}}
    assert smoke.args.scale == "smoke" and not m.check_splits(smoke)["compared"]


def test_the_teacher_and_tuning_teacher_repeat_study_2s_commands(tmp_path):
    """T3 and the tuning teacher are study 2's recorded commands (paths aside), so that the
    record can check them; check_study2 reports which record a result reproduces."""
    ctx = _ctx(tmp_path)
    steps = _steps(ctx)
    recorded = json.loads(m.STUDY2_RESULTS.read_text())
    for ours, theirs in (("teacher_T3_s0", "teacher_T3_s0"), ("tune_teacher", "tune_teacher_1")):
        entry = recorded["steps"][theirs]
        now = steps[ours].command(ctx)
        was = entry["command"].replace(f"/runs/{theirs} ", f"/runs/{ours} ")  # its run dir
        assert record.comparable(now, str(ctx.work), str(ctx.data)) == record.comparable(
            was, recorded["workdir"], recorded["data"]), ours
    # a result equal to T3's record reproduces it and not T's (AVX-512) record
    ctx.results = {"teacher_T3_s0": dict(recorded["steps"]["teacher_T3_s0"]["result"],
                                         run_dir="/elsewhere")}
    out = m.check_study2(ctx)["steps"]["teacher_T3_s0"]
    assert out["teacher_T3_s0"]["equal"] is True
    assert out["teacher_T_s0"]["equal"] is False
    assert "last_train_loss" in out["teacher_T_s0"]["differences"][0]


# -- the step graph and the commands the choices build -----------------------------------------


@pytest.mark.parametrize("scale", ["smoke", "full"])
def test_steps_graph(scale, tmp_path):
    """Every dependency exists and comes first; the rows name existing steps; question 1 is
    3 record sets x the views x the seeds and waits for no choice on V; the 9x rows wait for
    the budget rule, which waits for questions 1, 3 and 4; list order is the README's
    priority."""
    ctx = _ctx(tmp_path, scale)
    steps = _steps(ctx)
    order = list(steps)
    assert check_graph(list(steps.values()), m.row_spec(ctx)) == []
    sc = ctx.scale
    q1 = [n for n in order if n.startswith("ssld_L_") and f"_x{sc.multiple}_" in n]
    assert len(q1) == len(m.RECORD_SETS) * len(sc.views) * len(sc.seeds)
    for name in q1:
        assert "choose_best" not in ancestors(steps, name)
        rs = name.split("_")[2]
        assert f"choose_tune_ssld_{rs}" in steps[name].deps
        assert {"teacher_T3_s0", "tune_teacher", "check_splits"} <= ancestors(steps, name)
    budget = ancestors(steps, "budget_x9")
    assert {"choose_best", "eval_ssld_L+U_best_x3_s2", "eval_kl_L_logits_t4_x3_s0"} <= budget
    for s in sc.seeds:
        for row in ("best", "crop"):
            assert f"allow_x9_s{s}" in steps[f"ssld_L_{row}_x{sc.long_multiple}_s{s}"].deps
    # priority: 4-view cells, 16-view cells, question 4, question 3, question 2
    first = {key: min(order.index(n) for n in order if n.startswith(key))
             for key in ("ssld_L_crop_v4", "ssld_L_crop_v16", "kl_L_logits", "ssld_L+U_best",
                         "ssld_L_best_x9")}
    assert list(first) == sorted(first, key=first.get)
    assert max(order.index(n) for n in q1 if "_v4_" in n) < first["ssld_L_crop_v16"]
    # a step that reads a chosen store waits for every candidate store (fresh-machine resume)
    assert {f"inspect_L_{rs}_v{v}" for rs in ("ra", "mix") for v in sc.views} <= \
        set(steps["ssld_L_best_x9_s0"].deps)
    # equal steps: the estimate of L + U is the estimate of a question-1 run
    assert ctx.work_est["ssld_L+U_best_x3_s0"][1] == ctx.work_est["ssld_L_ra_v4_x3_s0"][1]


def test_stores_carry_their_record_sets(tmp_path):
    ctx = _ctx(tmp_path)
    steps = _steps(ctx)

    def cmd(name):
        return " ".join(map(str, steps[name].command(ctx)))

    for v in ctx.scale.views:
        assert "--augment" not in cmd(f"infer_L_crop_v{v}") and f"--views {v} " in cmd(
            f"infer_L_crop_v{v}")
        assert cmd(f"infer_L_ra_v{v}").endswith("--augment rand-m9-n2-mstd0.5 --erase 0.25")
        assert cmd(f"infer_L_mix_v{v}").endswith(
            "--erase 0.25 --mixup 1.0 --cutmix 1.0 --mix-prob 0.75 --mixup-switch-prob 0.5")
    assert cmd("infer_L_logits").endswith("--store-logits") and "--views 4 " in cmd(
        "infer_L_logits")
    for rs in m.RECORD_SETS:  # the grids' stores: Ltrain, 4 views, the tuning teacher
        c = cmd(f"infer_dev_{rs}")
        assert "Ltrain.txt" in c and "runs/tune_teacher/last.pt" in c and "--views 4 " in c
    assert "--embeddings" in cmd("infer_U_v1") and "--views 1 " in cmd("infer_U_v1")


def _fake_choices(ctx, lrs=None):
    lrs = lrs or {"crop": 1.6, "ra": 0.8, "mix": 3.2}
    for rs, lr in lrs.items():
        ctx.results[f"choose_tune_ssld_{rs}"] = {"lr": lr, "weight_decay": 5e-5}
    for v in ctx.scale.views:
        for rs in m.RECORD_SETS:
            ctx.results[f"inspect_L_{rs}_v{v}"] = {"rows": 6000}
    ctx.results["inspect_L_logits"] = {"rows": 6000}
    ctx.results["inspect_Lbest+Usel"] = {"rows": 16000}
    ctx.results["choose_best"] = {"best": {"records": "mix", "views": 16},
                                  "best_augmented": {"records": "ra", "views": 4}}


def test_commands_follow_the_choices(tmp_path):
    """Each row trains with its record set's lr chosen on dev; questions 2 and 3 read the cells
    choose_best picked; question 4 trains KL at a quarter of crop-only's JS lr; L + U takes
    the steps of L (equal steps)."""
    ctx = _ctx(tmp_path)
    steps = _steps(ctx)
    _fake_choices(ctx)

    def cmd(name):
        return " ".join(map(str, steps[name].command(ctx)))

    assert "--lr 0.8 " in cmd("ssld_L_ra_v16_x3_s1") and "L_ra_v16.zarr" in cmd(
        "ssld_L_ra_v16_x3_s1") and "--epochs 48 " in cmd("ssld_L_ra_v16_x3_s1")
    usel = cmd("infer_Usel")
    assert "--views 16 " in usel and "--mixup 1.0" in usel and "splits/Usel.txt" in usel
    assert "L_mix_v16.zarr" in cmd("merge_Lbest+Usel") and "Usel.zarr" in cmd("merge_Lbest+Usel")
    lu = cmd("ssld_L+U_best_x3_s0")
    assert "--lr 3.2 " in lu and "Lbest+Usel.zarr" in lu
    assert f"--epochs {study2.equal_epochs(48, 6000, 16000)} " in lu
    assert "--warmup-epochs 0.375 " in lu  # one L-epoch's steps, in epochs of L + U
    best9, crop9 = cmd("ssld_L_best_x9_s2"), cmd("ssld_L_crop_x9_s2")
    assert "L_ra_v4.zarr" in best9 and "--lr 0.8 " in best9 and "--epochs 144 " in best9
    assert "L_crop_v4.zarr" in crop9 and "--lr 1.6 " in crop9 and "--epochs 144 " in crop9
    t4 = cmd("kl_L_logits_t4_x3_s0")
    assert t4.endswith("--loss kl --temperature 4") and "--lr 0.4 " in t4
    assert "L_logits.zarr" in t4 and "--seed 0 " in t4


# -- the rules ---------------------------------------------------------------------------------


def test_compare_is_the_declared_rule():
    """|diff| > max(floor, 2 SE), SE from sample variances, computed here by hand."""
    a, b = [0.80, 0.81, 0.82], [0.78, 0.79, 0.80]
    se = math.sqrt(0.01 ** 2 / 3 + 0.01 ** 2 / 3)
    c = m.compare(a, b, 0.005)
    assert c["diff"] == pytest.approx(0.02) and c["se"] == pytest.approx(se)
    assert c["bar"] == pytest.approx(2 * se) and c["clear"] is True
    # the same means with a spread four times larger: the bar is above the difference
    wide = m.compare([0.77, 0.81, 0.85], [0.75, 0.79, 0.83], 0.005)
    assert wide["diff"] == pytest.approx(0.02) and wide["clear"] is False
    # no spread at all: the floor decides
    assert m.compare([0.804] * 3, [0.80] * 3, 0.005)["clear"] is False
    assert m.compare([0.806] * 3, [0.80] * 3, 0.005)["clear"] is True
    assert m.compare([0.9], [0.8, 0.81], 0.005)["clear"] is None


def test_gap_change_combines_the_two_gaps_errors():
    short = ([0.80, 0.81, 0.82], [0.79, 0.80, 0.81])        # gap +1 point, SE_3
    long = ([0.86, 0.87, 0.88], [0.82, 0.83, 0.84])         # gap +4 points, SE_9
    g = m.gap_change(long[0], long[1], short[0], short[1], 0.005)
    se3 = math.sqrt(2 * 0.01 ** 2 / 3)
    assert g["diff"] == pytest.approx(0.03)
    assert g["se"] == pytest.approx(math.sqrt(2) * se3)
    assert g["clear"] is True
    assert m.gap_change([0.86], [0.82], *short, 0.005)["clear"] is None


def test_best_cells_take_the_highest_mean_and_the_cheaper_on_ties():
    order = m.cells(m.SCALES["full"])
    top1 = {c: [0.80, 0.80, 0.80] for c in order}
    assert m.best_cells(top1, order) == {"best": ("crop", 4), "best_augmented": ("ra", 4)}
    top1[("mix", 16)] = [0.85, 0.84, 0.86]
    top1[("crop", 16)] = [0.90, 0.90, 0.90]
    assert m.best_cells(top1, order) == {"best": ("crop", 16), "best_augmented": ("mix", 16)}


def test_choose_best_records_the_cells_and_question_1s_verdicts(tmp_path):
    ctx = _ctx(tmp_path)
    sc = ctx.scale
    rng = random.Random(4)
    values = {}
    for rs, v in m.cells(sc):
        base = {"crop": 0.80, "ra": 0.83, "mix": 0.802}[rs] + (0.01 if v == 16 else 0)
        for s in sc.seeds:
            values[(rs, v, s)] = base + rng.uniform(-0.002, 0.002)
            ctx.results[f"eval_ssld_L_{rs}_v{v}_x3_s{s}"] = {"top1": values[(rs, v, s)]}
    out = m.choose_best(ctx)
    assert out["best"] == {"records": "ra", "views": 16}
    assert out["best_augmented"] == {"records": "ra", "views": 16}
    crop4 = [values[("crop", 4, s)] for s in sc.seeds]
    assert out["cells"]["crop_v4"]["mean"] == pytest.approx(statistics.fmean(crop4))
    assert out["comparisons"]["ra_v4 - crop_v4"]["clear"] is True
    assert out["comparisons"]["mix_v4 - crop_v4"]["clear"] is False
    assert out["comparisons"]["crop_v16 - crop_v4"]["diff"] == pytest.approx(
        statistics.fmean(values[("crop", 16, s)] for s in sc.seeds) - statistics.fmean(crop4))


def test_x9_seeds_fit_the_budget_left():
    hour = 3600.0
    assert m.x9_seeds(10 * hour, 6 * hour, hour, 2, 3) == 3
    assert m.x9_seeds(10 * hour, 8 * hour, hour, 2, 3) == 2   # 2 h left: 2 rounds of 2 runs
    assert m.x9_seeds(10 * hour, 8 * hour, hour, 1, 3) == 1   # one job: 2 runs per seed
    assert m.x9_seeds(10 * hour, 9.5 * hour, hour, 2, 3) == 0
    assert m.x9_seeds(10 * hour, 11 * hour, hour, 2, 3) == 0
    with pytest.raises(ValueError):
        m.x9_seeds(10 * hour, 0, 0, 2, 3)


def test_budget_x9_reads_the_driver_time_and_the_measured_throughput(tmp_path):
    """The seeds that fit: time left (10 h minus the sittings' wall in the results file) over
    one 9x run at the slower of the two cells' median throughput in question 1."""
    ctx = _ctx(tmp_path)
    _fake_choices(ctx)
    sc = ctx.scale
    for s, (ra_rate, crop_rate) in zip(sc.seeds, ((400, 500), (420, 520), (380, 480))):
        for rs, r in (("ra", ra_rate), ("crop", crop_rate)):
            ctx.results[f"ssld_L_{rs}_v4_x3_s{s}"] = {"images_seen": 288000,
                                                      "train_seconds": 288000 / r}
    write_json(tmp_path / "results.json",
               {"sessions": [{"wall_s": 3 * 3600.0}, {"wall_s": 4 * 3600.0}]})
    out = m.budget_x9(ctx)
    run_s = 144 * 6000 / 400 + m.RUN_OVERHEAD_S
    assert out["run_s"] == pytest.approx(run_s)
    assert out["used_s"] == pytest.approx(7 * 3600)
    assert out["seeds"] == min(3, int(3 * 3600 * 2 // (2 * run_s)))
    ctx.results["budget_x9"] = out | {"seeds": 1}
    assert m.allow_x9(ctx, 0) == {"seed": 0}
    with pytest.raises(RuntimeError, match="does not fit the budget"):
        m.allow_x9(ctx, 1)


def test_the_selection_is_written_without_the_teachers_labels(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.stores.mkdir(parents=True)
    (ctx.stores / "U_v1_top1000.txt").write_text("pool/a.png 3\npool/b.png 7\n")
    out = m.write_selection(ctx, "U_v1_top1000")
    assert read_list(ctx.splits / "Usel.txt") == [("pool/a.png", None), ("pool/b.png", None)]
    assert (ctx.splits / "Usel.txt").read_text() == "pool/a.png\npool/b.png\n"
    assert out["rows"] == 2


# -- the report --------------------------------------------------------------------------------


def _fake_results(tmp_path, missing=()):
    """A results file of the full scale: every question-1 seed but ``missing``, the choices,
    the 9x rows' seed 0 only, question 3 and 4."""
    ctx = _ctx(tmp_path)
    rows = m.row_spec(ctx)
    rng = random.Random(9)
    steps, top1 = {}, {}
    for row in rows:
        for tr, ev in zip(row["train_steps"], row["eval_steps"]):
            if ev in missing or (row["question"] == "2" and not ev.endswith("_s0")):
                continue
            top1[ev] = rng.uniform(0.75, 0.9)
            steps[ev] = {"done": True, "result": {"top1": top1[ev], "top5": 0.99}}
            steps[tr] = {"done": True, "wall_s": 60.0, "result": {
                "steps": 736 * (row["multiple"] or 1), "epochs": 16, "train_seconds": 50.0,
                "lr": 0.4}}
    for v in ctx.scale.views:
        for rs in m.RECORD_SETS:
            steps[f"inspect_L_{rs}_v{v}"] = {"done": True, "result": {
                "bytes_per_row_view": 26.0 + len(rs), "record_bytes_per_view": (
                    {} if rs == "crop" else {"aug_ops": 0.8, "aug_levels": 0.8})}}
            steps[f"infer_L_{rs}_v{v}"] = {"done": True, "wall_s": 10.0 * v * len(rs),
                                           "result": {}}
    steps["choose_best"] = {"done": True, "result": {
        "best": {"records": "mix", "views": 16},
        "best_augmented": {"records": "ra", "views": 4}}}
    data = {"scale": "full", "updated": "now", "rows": rows, "steps": steps,
            "scale_config": dataclasses.asdict(ctx.scale)}
    return data, top1


def test_report_tables_and_verdicts_come_from_the_finished_seeds(tmp_path):
    np = pytest.importorskip("numpy")
    data, top1 = _fake_results(tmp_path, missing=("eval_ssld_L_mix_v16_x3_s2",))
    md = rep.write_markdown(Results(data), None)
    q1 = md.split("### Question 1", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    lines = [ln for ln in q1.splitlines()[2:]]
    assert len(lines) == 6
    for line, (rs, v) in zip(lines, m.cells(m.SCALES["full"])):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        vals = [top1[f"eval_ssld_L_{rs}_v{v}_x3_s{s}"] for s in (0, 1, 2)
                if f"eval_ssld_L_{rs}_v{v}_x3_s{s}" in top1]
        assert cells[1] == str(v) and cells[2] == ("2/3" if len(vals) == 2 else "3")
        assert cells[3] == f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals, ddof=1):.2f}"
        assert cells[4] == f"{26.0 + len(rs):.1f}"
        assert cells[7] == f"{len(rs) / 4:.2f}×"  # teacher pass vs crop only at the same views
    ra = [top1[f"eval_ssld_L_ra_v4_x3_s{s}"] for s in (0, 1, 2)]
    crop = [top1[f"eval_ssld_L_crop_v4_x3_s{s}"] for s in (0, 1, 2)]
    c = m.compare(ra, crop, 0.005)
    assert f"- ra/4 views − crop/4 views: {100 * c['diff']:+.2f} points, SE {100 * c['se']:.2f}" \
        in md
    # question 2: the 3x side is question 1's cells; the 9x rows have one seed: no verdict
    q2 = md.split("### Question 2", 1)[1].split("### Question 3", 1)[0]
    assert "(1/3)" in q2 and "Change of the gap from 3× to 9×: " in q2
    assert q2.count("no verdict") == 2  # the 9x gap and its change
    # question 3: L is question 1's best cell (mix, 16 views, 2 of 3 seeds)
    q3 = md.split("### Question 3", 1)[1].split("### Question 4", 1)[0]
    assert "| L (question 1's cell) | 2/3 |" in q3 and "(L + U) − L:" in q3
    assert "bar max(1 point" in md.split("### Question 4", 1)[1]


def test_report_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    data, _ = _fake_results(tmp_path)
    png = tmp_path / "plot.png"
    assert rep.write_plot(Results(data), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data["steps"] = {}
    assert not rep.write_plot(Results(data), png)
