"""Clean-room checks: every module imports, and every third-party import is a declared dependency.

The development machine's Python may hold packages that a user's fresh virtual environment does not
(scipy and pillow were once imported without being declared, so the README's first command failed on a
clean machine). CI runs this file in a fresh ``python -m venv`` with only what ``setup.cfg`` declares, so
an undeclared import fails here instead of in a user's hands.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata as metadata
import pkgutil
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"shared_nets", "tools", "tests"}


def _modules(package: str) -> list[str]:
    root = REPO / package
    names = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=f"{package}."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module", _modules("shared_nets") + _modules("tools"))
def test_module_imports(module):
    """Each module of the installable package and of the CLI imports in this environment."""
    importlib.import_module(module)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    """Distribution names declared in setup.cfg: ``install_requires`` and each extra."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")

    def names(text: str) -> set[str]:
        out = set()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.add(_canonical(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]))
        return out

    declared = {"install_requires": names(cfg.get("options", "install_requires"))}
    for extra, text in cfg.items("options.extras_require"):
        declared[extra] = names(text)
    return declared


def _with_meta_packages(declared: set[str], providers: dict[str, list[str]]) -> set[str]:
    """Add the requirements of declared meta-packages (``itk`` installs no module, ``itk-core`` does)."""
    with_modules = {_canonical(d) for dists in providers.values() for d in dists}
    out = set(declared)
    for name in declared - with_modules:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        out |= {_canonical(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r}
    return out


def _third_party_imports(folder: str) -> dict[str, set[str]]:
    """Top-level module names imported anywhere (also inside functions) under ``folder`` -> files."""
    found: dict[str, set[str]] = {}
    for path in (REPO / folder).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize(
    "folder, sections",
    [
        ("shared_nets", ("install_requires",)),
        ("tools", ("install_requires", "lite")),
        ("tests", ("install_requires", "test")),
    ],
)
def test_imports_are_declared(folder, sections):
    """Every third-party module imported by ``folder`` comes from a distribution declared in ``sections``."""
    providers = metadata.packages_distributions()
    declared = _with_meta_packages(set().union(*(_declared()[s] for s in sections)), providers)
    missing = []
    for module, files in sorted(_third_party_imports(folder).items()):
        dists = {_canonical(d) for d in providers.get(module, [])}
        if not dists:
            missing.append(f"{module} (not installed; imported by {sorted(files)[0]})")
        elif not dists & declared:
            missing.append(f"{module} (from {sorted(dists)}; imported by {sorted(files)[0]})")
    assert not missing, f"undeclared imports in {folder}/ (add them to setup.cfg {sections}): {missing}"


def test_declaration_check_catches_an_undeclared_import(tmp_path, monkeypatch):
    """Control: a module that imports an installed but undeclared distribution is reported."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    import pytest\n")
    (tmp_path / "setup.cfg").write_text(
        "[options]\ninstall_requires =\n    numpy\n[options.extras_require]\ntest =\n    hypothesis\n"
    )
    with pytest.raises(AssertionError, match="pytest"):
        test_imports_are_declared("pkg", ("install_requires",))
