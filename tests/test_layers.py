"""The layering (docs/architecture.md), checked: import-linter's contracts in setup.cfg, what the
store library imports when it runs, that nothing imports another package's private names, that
docs/architecture.md names every public name, and that no line of a tracked Python file is longer
than 100 characters (the project's line length, also in setup.cfg's [flake8] section).

CI runs ``python -m pytest``, so a broken contract fails CI like any other test.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("labelstore", "teacher_infer", "student_train")
# What the store library may import besides the standard library: the issue-22 list, and the
# optional ones, each imported inside the one function that needs it (setup.cfg says why).
STORE_IMPORTS = {"numpy", "zarr", "numcodecs", "google_crc32c", "fsspec"}
STORE_OPTIONAL = {"h5py": {"labelstore._export"}, "tqdm": {"labelstore._progress"},
                  "xarray": {"labelstore._reader"}, "pandas": {"labelstore._reader"}}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}


def test_import_linter_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]' (import-linter)")
    done = subprocess.run([str(linter), "--config", str(REPO / "setup.cfg"), "--no-cache"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "3 kept" in done.stdout, done.stdout[-2000:]


def test_the_store_library_imports_only_its_own_dependencies():
    """Every import statement in labelstore (at module level or inside a function) names the
    standard library, labelstore, one of STORE_IMPORTS, or a declared optional import from the
    one module allowed to make it."""
    import grimp

    graph = grimp.build_graph("labelstore", include_external_packages=True)
    found = {}
    for module in graph.find_descendants("labelstore") | {"labelstore"}:
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top == "labelstore" or top in sys.stdlib_module_names or top in STORE_IMPORTS:
                continue
            found.setdefault(top, set()).add(module)
    assert {top: modules for top, modules in found.items()
            if not modules <= STORE_OPTIONAL.get(top, set())} == {}


def test_the_store_commands_run_without_torch_click_or_images(tmp_path):
    """Import labelstore, then create, read, select, merge, ensemble, inspect and verify
    stores (no progress bars): none of the upper layers' dependencies is loaded."""
    code = f"""
import sys
import numpy as np
import labelstore

def store(path, seed):
    rng = np.random.default_rng(seed)
    with labelstore.create(path, keys=[f"k{{i}}.jpg" for i in range(40)], num_classes=5, topk=2,
                           chunk_rows=16) as writer:
        probs = rng.dirichlet(np.ones(5), 40)
        top = np.argsort(-probs, axis=1)[:, :2]
        writer.write(0, top[:, None], np.take_along_axis(probs, top, 1)[:, None])
    return path

a, b = store({str(tmp_path / 'a.zarr')!r}, 0), store({str(tmp_path / 'b.zarr')!r}, 1)
labelstore.open(a).load().dense([1, 2])
labelstore.select_topk([a], 3, {str(tmp_path / 's.zarr')!r})
labelstore.merge([{str(tmp_path / 's.zarr')!r}, b], {str(tmp_path / 'm.zarr')!r})
labelstore.ensemble([a, b], {str(tmp_path / 'e.zarr')!r})
str(labelstore.inspect_store(labelstore.open(a)))
assert labelstore.verify(a).ok
heavy = sorted(m for m in ("torch", "torchvision", "timm", "cv2", "click", "PIL", "nvidia",
                            "h5py", "tqdm", "threadpoolctl", "sklearn", "teacher_infer",
                            "student_train") if m in sys.modules)
print(heavy)
sys.exit(1 if heavy else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def _imports(path: Path):
    """(line, module, names) of every import statement of a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def _private(module: str, names: list[str]) -> list[str]:
    """The private parts (a ``_name`` module or imported name) of an import of a project
    package; none for other imports."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return []
    return [p for p in parts[1:] + names if p.startswith("_") and not p.startswith("__")]


@pytest.mark.parametrize("folder", ["benchmarks", *PACKAGES])
def test_no_private_name_of_another_package_is_imported(folder):
    """Benchmarks use public names only; a package uses another package's public names only
    (cli.py alone imports the packages' _cli modules: the click group's own wiring)."""
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module, names in _imports(path):
            if module.split(".")[0] == folder:
                continue  # a package's own modules
            private = _private(module, names)
            if private:
                bad.append(f"{path.relative_to(REPO)}:{line}: {module} {private}")
    assert bad == []


@pytest.mark.parametrize("package", ["labelstore", "teacher_infer", "teacher_infer.imaging",
                                     "teacher_infer.imaging.augment", "teacher_infer.runtime",
                                     "teacher_infer.dedup", "student_train"])
def test_every_public_name_has_its_reason_in_the_architecture_map(package):
    """docs/architecture.md says who needs each public name and why: a name added to an
    __all__ without a line there fails here."""
    import importlib

    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("## Public names"):text.index("## Where a new thing goes")]
    missing = [name for name in importlib.import_module(package).__all__
               if f"`{name}`" not in section]
    assert missing == []


MAX_LINE = 100  # the project's line length, in characters


def test_no_line_of_a_tracked_python_file_is_longer_than_the_line_length():
    """Every line of every git-tracked ``*.py`` file is at most MAX_LINE characters (not
    bytes: ``µ`` or ``×`` count one), the newline not counted."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=60).stdout
    paths = [REPO / name for name in listed.split("\0") if name]
    assert REPO / "tests" / "test_layers.py" in paths  # the listing found the code base
    long = []
    for path in paths:
        if not path.exists():  # deleted in the work tree, not yet in the index
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            width = len(line.removesuffix("\r"))
            if width > MAX_LINE:
                long.append(f"{path.relative_to(REPO)}:{number}: {width} characters")
    assert long == [], f"lines longer than {MAX_LINE} characters:\n" + "\n".join(long)
