"""A griffe extension (mkdocs.yml, mkdocstrings' ``extensions``) for the packages that export
names lazily: ``student_train``, ``teacher_infer.imaging`` and ``teacher_infer.imaging.augment``
map each public name to the submodule that defines it (``_WHERE = {name: submodule}``) and
import it on first use in a module ``__getattr__``, so that importing them loads no torch.
Griffe reads code without running it and sees no such name; this makes each one an alias of
its definition, so the API pages document exactly the names of ``__all__``."""
from __future__ import annotations

import ast
from pathlib import Path

import griffe


def _where(module: griffe.Module) -> dict[str, str]:
    """The module's ``_WHERE`` table (a dict literal at module level), or {}."""
    path = module.filepath
    if not isinstance(path, Path) or path.suffix != ".py":
        return {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "_WHERE" for t in node.targets)):
            return ast.literal_eval(node.value)
    return {}


def _modules(module: griffe.Module):
    yield module
    for sub in module.modules.values():
        if not sub.is_alias:
            yield from _modules(sub)


class LazyExports(griffe.Extension):
    """``_WHERE`` names → aliases of ``package.submodule.name``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for module in _modules(pkg):
            for name, submodule in _where(module).items():
                if name not in module.members:
                    module.set_member(name, griffe.Alias(
                        name, f"{module.path}.{submodule}.{name}", parent=module))

    on_package_loaded = on_package  # the event's name before griffe 2
