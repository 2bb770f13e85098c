"""Nothing outside what ssld wrote is deleted: --overwrite replaces only recognisable ssld
outputs, an output may not overlap an input (by real path: symlinked aliases too), and one
writer at a time holds an output (OUT.lock)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import labelstore
from cli import main as cli_main
from conftest import TINY_INPUT, TINY_MODEL, make_image
from test_labelstore import make_store


def run_cli(capsys, argv):
    status = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.err.strip()


def refused(capsys, argv, *fragments):
    status, err = run_cli(capsys, argv)
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def tree(path):
    """Every file below ``path`` with its bytes (what must survive a refused command)."""
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "victim" / "p.zarr"
    path.parent.mkdir()
    make_store(str(path), n=40, views=1, k=3, classes=5, chunk_rows=16)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "victim_images"
    for i in range(6):
        make_image(folder / f"c{i % 2}" / f"{i}.png", size=(40, 36), seed=i)
    return folder


def infer_args(data, out, *extra):
    return ["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data", data,
            "--out", out, "--input-size", TINY_INPUT, "--topk", 2, "--num-workers", 0,
            "--no-progress", "--decoder", "pil", "--device", "cpu", "--threads", 1, *extra]


# -- outputs never overlap inputs -----------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside"])
def test_infer_teacher_out_on_its_own_data_is_refused(images, capsys, where):
    before = tree(images)
    out = images if where == "same" else images / "c0" / "x.zarr"
    refused(capsys, infer_args(images, out, "--overwrite"), "--data", "nothing was written")
    assert tree(images) == before


def test_out_containing_an_input_is_refused(pool, capsys):
    refused(capsys, ["select-topk", "--store", pool, "--k", 2, "--out", pool.parent,
                     "--overwrite"], "contains one of the input stores")
    assert labelstore.open(str(pool)).valid.all()


@pytest.mark.parametrize("command", ["merge", "select-topk"])
def test_an_alias_of_an_input_through_a_symlink_is_refused(pool, tmp_path, capsys, command):
    other = tmp_path / "other.zarr"
    make_store(str(other), n=8, views=1, k=3, classes=5, chunk_rows=16, seed=3)
    alias = tmp_path / "victimalias"
    alias.symlink_to(pool.parent, target_is_directory=True)
    before = tree(pool)
    argv = (["merge", pool, other, "--out", alias / "p.zarr", "--overwrite"]
            if command == "merge" else
            ["select-topk", "--store", pool, "--k", 2, "--out", alias / "p.zarr", "--overwrite"])
    refused(capsys, argv, "is one of the input stores")
    assert tree(pool) == before
    assert labelstore.open(str(pool)).valid.all()


def test_train_student_out_must_not_be_a_store_or_inside_the_images(pool, images, tmp_path,
                                                                    capsys):
    base = ["train-student", "--student", TINY_MODEL, "--epochs", 1, "--device", "cpu",
            "--threads", 1]
    before = tree(pool)
    refused(capsys, base + ["--store", pool, "--out", pool], "is a label store")
    refused(capsys, base + ["--store", pool, "--out", pool.parent], "contains a --store")
    refused(capsys, base + ["--supervised", "--data", images, "--out", images / "run"],
            "is inside --data")
    other = tmp_path / "plain.zarr"
    make_store(str(other), n=8, views=1, k=3, classes=5, chunk_rows=16)
    refused(capsys, base + ["--supervised", "--data", images, "--out", other],
            "is a label store")
    assert tree(pool) == before


# -- --overwrite replaces only what ssld wrote -----------------------------------------
def test_overwrite_refuses_a_directory_that_is_not_a_store(pool, tmp_path, capsys):
    target = tmp_path / "notastore"
    target.mkdir()
    (target / "important.txt").write_text("keep me")
    refused(capsys, ["select-topk", "--store", pool, "--k", 2, "--out", target, "--overwrite"],
            "not an ssld label store")
    assert (target / "important.txt").read_text() == "keep me"


def test_overwrite_refuses_a_store_holding_foreign_files(pool, tmp_path, capsys):
    out = tmp_path / "sel.zarr"
    argv = ["select-topk", "--store", pool, "--k", 2, "--out", out]
    assert run_cli(capsys, argv)[0] == 0
    (out / "notes.md").write_text("mine")
    refused(capsys, argv + ["--overwrite"], "'notes.md'", "did not write")
    assert (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    assert run_cli(capsys, argv + ["--overwrite"])[0] == 0  # a store of ours is replaced
    assert labelstore.open(str(out)).is_complete


def test_export_overwrite_replaces_only_an_export(pool, tmp_path, capsys):
    foreign = tmp_path / "data.h5"
    foreign.write_bytes(b"not an export")
    refused(capsys, ["export", pool, "--out", foreign, "--overwrite"], "not an HDF5 file")
    assert foreign.read_bytes() == b"not an export"
    out = tmp_path / "labels.h5"
    assert run_cli(capsys, ["export", pool, "--out", out])[0] == 0
    assert run_cli(capsys, ["export", pool, "--out", out, "--overwrite"])[0] == 0


def test_dedup_replaces_only_its_own_output(tmp_path, capsys):
    query, poolpath = tmp_path / "q.zarr", tmp_path / "u.zarr"
    rng = np.random.default_rng(0)
    for path in (query, poolpath):
        with labelstore.create(str(path), keys=[f"{i}.png" for i in range(6)], num_classes=4,
                               topk=2, embedding_dim=8) as writer:
            writer.write(0, np.tile([0, 1], (6, 1, 1)), np.full((6, 1, 2), 0.4),
                         embeddings=rng.normal(size=(6, 8)))
    foreign = tmp_path / "notes.tsv"
    foreign.write_text("precious\n")
    refused(capsys, ["dedup", "--query", query, "--pool", poolpath, "--verify", "none",
                     "--out", foreign], "not an ssld dedup output")
    assert foreign.read_text() == "precious\n"


def test_prepare_overwrite_refuses_foreign_content(tmp_path, capsys):
    out = tmp_path / "prepared"
    (out / "images" / "holiday").mkdir(parents=True)
    (out / "images" / "holiday" / "beach.jpg").write_bytes(b"jpeg")
    refused(capsys, ["prepare", "digits", "--out", out, "--overwrite"], "images/holiday")
    assert (out / "images" / "holiday" / "beach.jpg").exists()


# -- one writer per output --------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from labelstore import OutputLock
    lock = OutputLock(sys.argv[1], command="holder").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_second_writer_is_refused_while_the_first_holds_the_output(pool, tmp_path, capsys):
    out = tmp_path / "sel.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p)))
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refused(capsys, ["select-topk", "--store", pool, "--k", 2, "--out", out],
                      "being written by another ssld run", f"pid {holder.pid}", "holder")
        assert "--overwrite" not in err  # never advice that would delete the other run's work
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file is left, but nobody holds it.
    assert os.path.exists(f"{out}.lock")
    assert run_cli(capsys, ["select-topk", "--store", pool, "--k", 2, "--out", out])[0] == 0
    assert not os.path.exists(f"{out}.lock")  # released and removed at the end


HOLDER_WITH_WORKER = textwrap.dedent("""
    import os, sys, time
    from labelstore import OutputLock
    lock = OutputLock(sys.argv[1], command="holder").acquire()
    worker = os.fork()          # as a DataLoader worker is: it outlives a killed parent
    if worker == 0:
        time.sleep(60)
        os._exit(0)
    print(worker, flush=True)
    time.sleep(120)
""")


def test_the_lock_dies_with_its_holder_even_when_forked_workers_live_on(tmp_path):
    """kill -9 of the holder frees OUT.lock at once, though a forked child (a DataLoader
    worker) still runs: the child never holds the lock (a flock it would share)."""
    import signal

    out = tmp_path / "sel.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_WITH_WORKER, str(out)],
                              stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(labelstore.LockedError, match=f"pid {holder.pid}"):
            labelstore.OutputLock(out).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker, 0)                       # the worker is alive ...
        with labelstore.OutputLock(out, command="next run"):   # ... and the lock is free
            assert json.loads(open(f"{out}.lock").read())["command"] == "next run"
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_lock_in_the_holding_process_is_refused_and_keeps_the_first(tmp_path):
    """A record lock is released by closing any descriptor of its file in the holder:
    refusing a second lock of the same output must not open (and close) the file."""
    out = tmp_path / "sel.zarr"
    take = ("import sys\nfrom labelstore import OutputLock, LockedError\n"
            "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept LockedError:\n"
            "    sys.exit(3)\n")
    with labelstore.OutputLock(out, command="first"):
        for _ in range(2):
            with pytest.raises(labelstore.LockedError, match="first"):
                labelstore.OutputLock(out).acquire()
        assert subprocess.run([sys.executable, "-c", take, str(out)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", take, str(out)]).returncode == 0


def test_a_refused_lock_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "deeper" / "sel.zarr"
    with labelstore.OutputLock(out, command="first"):
        with pytest.raises(labelstore.LockedError):
            labelstore.OutputLock(out).acquire()
        assert (tmp_path / "new" / "deeper").is_dir()   # the first run's folder stays
    assert not (tmp_path / "new").exists()              # made for a lock, nothing written


def test_infer_teacher_is_refused_while_another_run_writes_the_store(images, tmp_path, capsys):
    out = tmp_path / "t.zarr"
    with labelstore.OutputLock(out, command="other run"):
        refused(capsys, infer_args(images, out), "being written by another ssld run",
                "other run")
    assert run_cli(capsys, infer_args(images, out))[0] == 0
    assert labelstore.open(str(out)).is_complete
