"""The documentation is checked like code (issue 26):

- docs/cli.md is what ``python -m tools.cli_reference`` generates from the click commands;
- ``mkdocs build --strict`` builds the site (a broken link, anchor or docstring fails);
- every python or shell block of README.md and docs/ is marked (tools/doc_examples.py): "run"
  blocks run here at tiny sizes in a temporary folder, after the setup they name; the ``ssld``
  command lines of every block name commands and options that exist;
- docs/format.md's "Reading a store without ssld" readers (plain zarr, xarray, h5py) return
  what ``labelstore`` reads from the same store.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import cli
import labelstore
from tools import cli_reference, doc_examples

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_BUILTINS = {".", "cd", "export", "echo", "set", "test", "[", "source", "true", "false"}


def _env(extra_path: Path | None = None) -> dict[str, str]:
    path = os.environ.get("PATH", "")
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get(
                "PYTHONPATH", "").split(os.pathsep) if p]),
            "PATH": f"{extra_path}{os.pathsep}{path}" if extra_path else path,
            "SSLD_THREADS": "1", "NO_MKDOCS_2_WARNING": "1"}


# -- docs/cli.md ---------------------------------------------------------------------------

def test_cli_reference_is_what_the_commands_generate():
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == cli_reference.render(), (
        f"docs/cli.md is out of date with the click commands: run `{cli_reference.COMMAND}`")


def _commands(group, path=("ssld",)):
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_cli_reference_has_every_command_option_and_default():
    """Walk the click group independently of the generator: every command has its heading,
    and in its section every option name and every shown default."""
    import click

    text = cli_reference.render()
    for path, command in _commands(cli.ssld):
        heading = f"`{' '.join(path)}`\n"
        assert heading in text, f"no section for {' '.join(path)}"
        section = text.split(heading, 1)[1].split("\n#", 1)[0]
        for param in command.params:
            if isinstance(param, click.Option):
                for name in (*param.opts, *param.secondary_opts):
                    assert f"`{name}" in section or f", {name}" in section or \
                        f"/ {name}" in section, f"{' '.join(path)}: {name} missing"
                if param.show_default is True and param.default not in (None, False, ()):
                    shown = (" ".join(map(str, param.default))
                             if isinstance(param.default, tuple) else str(param.default))
                    if param.is_bool_flag and param.secondary_opts:  # --x / --no-x: the one on
                        shown = (param.opts if param.default else param.secondary_opts)[0]
                        shown = shown.lstrip("-")
                    row = next(r for r in section.splitlines() if f"`{param.opts[0]} " in r
                               or f"`{param.opts[0]}`" in r)
                    assert shown.split()[0].rstrip(",") in row, (path, param.name, row)


def test_cli_reference_check_mode_fails_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "cli.md"
    stale.write_text(cli_reference.render().replace("--views-from", "--view-from"))
    assert cli_reference.main(["--check", "--out", str(stale)]) == 1
    assert cli_reference.COMMAND in capsys.readouterr().err
    assert cli_reference.main(["--out", str(stale)]) == 0
    assert cli_reference.main(["--check", "--out", str(stale)]) == 0


# -- the site ------------------------------------------------------------------------------

def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(config), "--site-dir", str(site)], cwd=config.parent,
                          env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path):
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    pytest.importorskip("mkdocstrings_handlers.python",
                        reason="mkdocstrings-python is not installed")
    done = _mkdocs(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-4000:]
    site = tmp_path / "site"
    home = (site / "index.html").read_text()
    assert "semi-supervised label knowledge distillation" in home       # the README
    assert 'href="repo/experiments/fashion_mnist/"' in home              # its links resolved
    api = (site / "api" / "student_train" / "index.html").read_text()
    assert 'id="student_train.TrainConfig"' in api                     # lazily exported names
    assert 'id="student_train.StoreDataset"' in api and 'id="student_train.SparseTargets"' in api
    assert "StoreDataset" in (site / "own-loop" / "index.html").read_text()   # in the nav
    assert 'id="teacher_infer.imaging.augment.ViewReplay"' in (
        site / "api" / "augment" / "index.html").read_text()


def _tiny_site(root: Path, readme: str) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "guide.md").write_text("# Guide\n\n## Part one\n\n"
                                            "Back [home](../README.md).\n")
    (root / "study").mkdir()
    (root / "study" / "README.md").write_text("# Study\n\nSee [the guide](../docs/guide.md) "
                                              "and [the script](run.py).\n")
    (root / "study" / "run.py").write_text("print('hi')\n")
    (root / "README.md").write_text(readme)
    config = root / "mkdocs.yml"
    config.write_text("site_name: t\ndocs_dir: docs\n"
                      f"hooks:\n  - {REPO / 'tools' / 'mkdocs_hooks.py'}\n"
                      "validation:\n  anchors: warn\n  omitted_files: warn\n"
                      "nav:\n  - index.md\n  - guide.md\n")
    return config


def test_site_links_resolve_as_in_the_repository_and_broken_ones_fail(tmp_path):
    good = "# Home\n\n[guide](docs/guide.md#part-one), [study](study/), [code](study/run.py)\n"
    done = _mkdocs(_tiny_site(tmp_path / "good", good), tmp_path / "good-site")
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "good-site"
    home = (site / "index.html").read_text()
    assert 'href="guide/#part-one"' in home and 'href="repo/study/"' in home
    assert (site / "repo" / "study" / "run.py").read_text() == "print('hi')\n"
    assert 'href="../../guide/"' in (site / "repo" / "study" / "index.html").read_text()
    for broken, named in (("[gone](docs/missing.md)", "missing.md"),
                          ("[anchor](docs/guide.md#part-two)", "part-two"),
                          ("[outside](../elsewhere.md)", "elsewhere.md")):
        root = tmp_path / named.replace(".", "_")
        done = _mkdocs(_tiny_site(root, f"# Home\n\n{broken}\n"), root / "site")
        assert done.returncode != 0 and named in done.stderr, (broken, done.stderr[-2000:])


# -- the examples --------------------------------------------------------------------------

def _all_blocks() -> list[doc_examples.Block]:
    found = []
    for path in DOCS:
        found += [b for b in doc_examples.blocks(path) if b.is_example]
    return found


def test_every_example_is_marked():
    unmarked = [b.where(REPO) for b in _all_blocks() if b.kind is None]
    assert unmarked == [], ("mark each block as run or illustrative (tools/doc_examples.py): "
                            + ", ".join(unmarked))
    unknown = [f"{b.where(REPO)}: setup={b.setup}" for b in _all_blocks()
               if b.setup and b.setup not in SETUPS]
    assert unknown == []
    orphans = []
    for path in DOCS:
        previous = None
        for block in (b for b in doc_examples.blocks(path) if b.is_example):
            if block.cont and (previous is None or previous.kind != "run"):
                orphans.append(block.where(REPO))
            previous = block
    assert orphans == [], f"'continue' blocks without a run block before them: {orphans}"


def test_markers_that_are_not_the_syntax_are_refused(tmp_path):
    for text, message in (("<!-- example: runn -->\n```python\n1\n```\n", "starts with"),
                          ("<!-- example: run fast -->\n```python\n1\n```\n", "unknown word"),
                          ("<!-- example: illustrative -->\n\n```python\n1\n```\n",
                           "not right before"),
                          ("<!-- example: run -->\n```python\n1\n", "never closed")):
        (tmp_path / "x.md").write_text(text)
        with pytest.raises(ValueError, match=message):
            doc_examples.blocks(tmp_path / "x.md")


@pytest.mark.parametrize("block", [b for b in _all_blocks() if not b.is_python],
                         ids=lambda b: b.where(REPO))
def test_command_lines_name_commands_and_options_that_exist(block):
    invocations = doc_examples.ssld_invocations(block.text)
    problems = [f"{block.path.name}:{block.line + 1 + line}: {problem}"
                for line, args in invocations
                for problem in doc_examples.command_problems(args, cli.ssld)]
    assert problems == []


@pytest.mark.parametrize("block", [b for b in _all_blocks() if b.is_python],
                         ids=lambda b: b.where(REPO))
def test_python_examples_compile(block):
    compile("\n" * block.line + block.text, str(block.path), "exec")


@pytest.mark.parametrize("line, expected", [
    ("ssld train-student --studnet x --out y", ["ssld train-student: no option --studnet"]),
    ("torchrun --nproc_per_node 8 -m cli infer-teacher --model m --bogus=1 --out o",
     ["ssld infer-teacher: no option --bogus"]),
    ("python -m cli prepare digits --out d --seed -1", []),
    ("ssld prepare mnist --out d", ["ssld prepare: no command 'mnist'"]),
    ("ssld --debug dedup --query a --pool b --out - # --not-an-option", []),
    ("cd x && ssld evaluate --model m | jq .", ["ssld: no command 'evaluate'"]),
    ("ssld --verbose inspect s", ["ssld: no option --verbose"]),
])
def test_the_command_line_check_finds_unknown_names(line, expected):
    found = [problem for _, args in doc_examples.ssld_invocations(line)
             for problem in doc_examples.command_problems(args, cli.ssld)]
    assert found == expected


# setups: the files "run" blocks read, written into the block's folder

def _noise_png(path: Path, seed: int, size: int = 96) -> None:
    """A picture with corners and blobs at every scale (SIFT finds keypoints on it)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 6, size // 6, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize((size, size), Image.Resampling.NEAREST).save(path)


def _random_store(path: Path, n: int, *, seed: int, views: int = 2, topk: int = 3,
                  classes: int = 10, chunk_rows: int = 16, chunks: set[int] | None = None,
                  embeddings: np.ndarray | None = None, root: Path | None = None,
                  prefix: str = "img") -> Path:
    """A store of random teacher labels through labelstore.create: labels (some unknown),
    random boxes and flips, invalid rows with no mass, only ``chunks`` written (all: None)."""
    rng = np.random.default_rng(seed)
    keys = [f"{prefix}/{i:03d}.png" for i in range(n)]
    attrs = {"dataset": {"root": str(root)}} if root else None
    dist = rng.dirichlet(np.full(classes, 0.3), (n, views))
    top = np.argsort(-dist, axis=-1)[..., :topk]
    probs = np.take_along_axis(dist, top, -1)
    valid = rng.random(n) > 0.15
    probs[~valid] = 0
    residual = np.where(valid[:, None], 1 - probs.sum(-1), 0)
    y0, x0 = rng.uniform(0, 0.5, (2, n, views))
    boxes = np.stack([y0, x0, rng.uniform(0.1, 0.5, (n, views)),
                      rng.uniform(0.1, 0.5, (n, views))], axis=-1)
    flips = rng.random((n, views)) > 0.5
    with labelstore.create(path, keys=keys, num_classes=classes, topk=topk, views=views,
                           labels=rng.integers(-1, classes, n), chunk_rows=chunk_rows,
                           embedding_dim=None if embeddings is None else embeddings.shape[1],
                           attrs=attrs) as writer:
        for start in range(0, n, chunk_rows):
            if chunks is not None and start // chunk_rows not in chunks:
                continue
            rows = slice(start, start + chunk_rows)
            more = {} if embeddings is None else {"embeddings": embeddings[rows]}
            writer.write(start, top[rows], probs[rows], residual=residual[rows],
                         boxes=boxes[rows], flips=flips[rows], valid=valid[rows], **more)
    return path


def setup_store(workdir: Path, request) -> None:
    """train.zarr (and the same as runs/train.zarr): 40 rows in 3 chunks, 2 views, k 3, C 10."""
    _random_store(workdir / "train.zarr", 40, seed=0)
    shutil.copytree(workdir / "train.zarr", workdir / "runs" / "train.zarr")


def setup_train_store(workdir: Path, request) -> None:
    """train.zarr over its 40 images (images/img/NNN.png, its recorded root): 2 views, k 3,
    C 10, random boxes and flips, some rows invalid (docs/own-loop.md trains on it)."""
    for i in range(40):
        _noise_png(workdir / "images" / f"img/{i:03d}.png", seed=300 + i)
    _random_store(workdir / "train.zarr", 40, seed=5, root=workdir / "images")


def setup_store_incomplete(workdir: Path, request) -> None:
    """train.zarr with its middle chunk (rows 16-31) never written: an unfinished run."""
    _random_store(workdir / "train.zarr", 40, seed=0, chunks={0, 2})


def setup_selection(workdir: Path, request) -> None:
    """runs/train.zarr, and runs/val.zarr and runs/pool.zarr with embeddings and their images
    under images/: pool row 5 is val row 2 (same picture, same embedding), a duplicate that
    dedup finds and SIFT confirms."""
    rng = np.random.default_rng(1)
    images = workdir / "images"
    val_emb, pool_emb = rng.normal(size=(12, 16)), rng.normal(size=(40, 16))
    pool_emb[5] = val_emb[2]
    for i in range(12):
        _noise_png(images / f"val/{i:03d}.png", seed=100 + i)
    for i in range(40):
        _noise_png(images / f"pool/{i:03d}.png", seed=102 if i == 5 else 200 + i)
    _random_store(workdir / "runs/train.zarr", 24, seed=2, root=images, prefix="train")
    _random_store(workdir / "runs/val.zarr", 12, seed=3, root=images, prefix="val",
                  embeddings=val_emb)
    _random_store(workdir / "runs/pool.zarr", 40, seed=4, root=images, prefix="pool",
                  embeddings=pool_emb)


def setup_teachers(workdir: Path, request) -> None:
    """runs/t1.zarr and runs/t2.zarr: two random-weight tiny teachers on the same 2 views of
    the test image folder (the second with --views-from the first)."""
    import teacher_infer
    from conftest import TINY_INPUT, TINY_MODEL

    images = request.getfixturevalue("image_folder")
    common = dict(model=TINY_MODEL, random_weights=True, input_size=TINY_INPUT, topk=5,
                  batch_size=8, threads=1, num_workers=0, decoder="pil", device="cpu",
                  progress=False)
    teacher_infer.run(teacher_infer.InferConfig(data=str(images.data), views=2,
                                                out=str(workdir / "runs/t1.zarr"), **common))
    teacher_infer.run(teacher_infer.InferConfig(data=None, views_from=str(workdir / "runs/t1.zarr"),
                                                seed=1, out=str(workdir / "runs/t2.zarr"),
                                                **common))


SETUPS: dict[str, tuple[Callable, bool]] = {   # name: (function, slow)
    "store": (setup_store, False),
    "store_incomplete": (setup_store_incomplete, False),
    "train_store": (setup_train_store, False),
    "selection": (setup_selection, True),
    "teachers": (setup_teachers, True),
}


def _chains() -> list[list[doc_examples.Block]]:
    """Each run block with the continue blocks after it."""
    chains: list[list[doc_examples.Block]] = []
    for path in DOCS:
        for block in (b for b in doc_examples.blocks(path) if b.is_example and b.kind == "run"):
            if block.cont and chains and chains[-1][0].path == path:
                chains[-1].append(block)
            else:
                chains.append([block])
    return chains


RUNNER = """
import pickle, subprocess, sys
namespace = {"__name__": "__main__"}
with open(sys.argv[1], "rb") as file:
    chain, keep, out = pickle.load(file)
for python, where, line, source in chain:
    if python:  # line numbers of tracebacks are the markdown file's
        exec(compile("\\n" * line + source, where, "exec"), namespace)
    else:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", source])
        if done.returncode:
            sys.exit(f"{where}:{line}: the block exited with status {done.returncode}")
with open(out, "wb") as file:
    pickle.dump({name: namespace[name] for name in keep if name in namespace}, file)
"""


def run_chain(chain: list[doc_examples.Block], workdir: Path, request,
              setup: str | None = None, keep: tuple[str, ...] = ()) -> dict:
    """Run a chain of blocks in ``workdir`` (python in one process, so continue blocks share
    variables; shell blocks with ``ssld`` the checkout's), after its setup; returns the
    variables named in ``keep``."""
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = workdir.parent / f"{workdir.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "ssld"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli "$@"\n')
    shim.chmod(0o755)
    env = _env(bin_dir)
    for block in chain:
        if not block.is_python:
            missing = [p for p in doc_examples.programs(block.text) if p not in SHELL_BUILTINS
                       and shutil.which(p, path=env["PATH"]) is None]
            if missing:
                pytest.skip(f"{block.where(REPO)} needs {', '.join(missing)}, not installed")
    name = setup or chain[0].setup
    if name:
        SETUPS[name][0](workdir, request)
    job = bin_dir / "chain.pickle"
    out = bin_dir / "kept.pickle"
    with open(job, "wb") as file:
        pickle.dump(([(b.is_python, str(b.path), b.line, b.text) for b in chain], keep, str(out)),
                    file)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(job)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"{chain[0].where(REPO)}:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-5000:]}")
    with open(out, "rb") as file:
        return pickle.load(file)


def _chain_params():
    for chain in _chains():
        slow = chain[0].setup is not None and SETUPS.get(chain[0].setup, (None, False))[1]
        yield pytest.param(chain, id=chain[0].where(REPO),
                           marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("chain", list(_chain_params()))
def test_run_examples_run(chain, tmp_path, request):
    run_chain(chain, tmp_path / "work", request)


# -- docs/format.md: reading a store without ssld --------------------------------------------

def _format_chain(first_line_has: str) -> list[doc_examples.Block]:
    for chain in _chains():
        if chain[0].path.name == "format.md" and any(first_line_has in b.text for b in chain):
            return chain
    raise AssertionError(f"docs/format.md has no run block with {first_line_has!r}")


@pytest.mark.parametrize("setup", ["store", "store_incomplete"])
def test_plain_zarr_reader_of_the_format_reads_what_labelstore_reads(setup, tmp_path, request):
    names = ("keys", "written", "usable", "labels", "indices", "probs", "residual", "flips",
             "boxes", "targets")
    got = run_chain(_format_chain("zarr.open_group("), tmp_path / "w", request, setup, names)
    assert set(got) == set(names)
    store = labelstore.open(tmp_path / "w" / "train.zarr")
    rows = np.arange(len(store))
    part = store.read(rows)
    written = np.ones(len(store), bool)
    for start, stop in store.missing():
        written[start:stop] = False
    assert written.all() == (setup == "store")
    assert list(got["keys"]) == list(store.keys)
    np.testing.assert_array_equal(got["written"], written)
    np.testing.assert_array_equal(got["usable"], store.valid & written)
    np.testing.assert_array_equal(got["labels"], store.labels)
    for name in ("indices", "probs", "residual", "flips", "boxes"):
        np.testing.assert_array_equal(got[name], part[name], err_msg=name)
        assert got[name].dtype == part[name].dtype, name
    # the doc's dense reconstruction (float64) against labelstore's (float32), every row:
    # valid ones, invalid ones with no mass (uniform) and missing ones
    assert (written & ~store.valid).any()  # rows with no mass, which become uniform
    np.testing.assert_allclose(got["targets"], store.dense(rows, view=0), rtol=0, atol=2e-7)


def test_xarray_reader_of_the_format_reads_what_labelstore_reads(tmp_path, request):
    got = run_chain(_format_chain("xr.open_zarr("), tmp_path / "w", request,
                    keep=("top1", "top1_prob", "num_classes"))
    store = labelstore.open(tmp_path / "w" / "train.zarr")
    part = store.read(np.arange(len(store)))
    np.testing.assert_array_equal(got["top1"], part.indices[:, 0, 0])
    np.testing.assert_array_equal(got["top1_prob"], part.probs[:, 0, 0])
    assert got["num_classes"] == store.num_classes


def test_hdf5_reader_of_the_format_reads_what_labelstore_reads(tmp_path, request):
    names = ("keys", "indices", "probs", "residual", "boxes", "flips", "valid", "labels",
             "num_classes", "dataset", "first", "stop")
    got = run_chain(_format_chain("h5py.File("), tmp_path / "w", request, keep=names)
    assert set(got) == set(names)
    store = labelstore.open(tmp_path / "w" / "train.zarr")
    part = store.read(np.arange(len(store)))
    assert list(got["keys"]) == list(store.keys)
    for name in ("indices", "probs", "residual", "boxes", "flips", "valid"):
        np.testing.assert_array_equal(got[name], part[name], err_msg=name)
    np.testing.assert_array_equal(got["labels"], store.labels)
    assert got["num_classes"] == store.num_classes
    assert got["dataset"]["fingerprint"] == store.attrs["dataset"]["fingerprint"]
    assert (got["first"], got["stop"]) == (0, len(store))
