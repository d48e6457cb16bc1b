"""Bundle configs hold settings and wiring, not program logic.

Logic lives in named, tested Python callables that a config references by ``_target_`` or a short
``$name(...)``. These checks read every ``bundles/*/configs/*.json`` and fail on: a lambda, a list spliced by
position (``x[:-1] + y + x[-1:]``), an ``and``/``or`` chain used for its side effects in ``initialize`` or
``finalize``, a reference to a private name, and the pre-package ``shared_nets.nets`` paths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
CONFIGS = sorted(p for p in BUNDLES_DIR.glob("*/configs/*.json"))

LAMBDA = re.compile(r"\blambda\b")
SLICE = re.compile(r"[\w)\]]\[\s*(:|-)")  # x[:…] / x[-…] indexing, not a literal list [-1, 1]
CHAIN = re.compile(r"\s(and|or)\s")
PRIVATE = re.compile(r"\._[A-Za-z]")


def _strings(node, path: str = "") -> Iterator[tuple[str, str]]:
    """(config path, value) of every string in a config, with ``_target_`` values included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}#{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}#{i}")
    elif isinstance(node, str):
        yield path, node


def _expressions(config) -> Iterator[tuple[str, str]]:
    return ((p, s) for p, s in _strings(config) if s.startswith("$"))


def _ids(paths):
    return [f"{p.parent.parent.name}/{p.name}" for p in paths]


@pytest.fixture(params=CONFIGS, ids=_ids(CONFIGS))
def config(request):
    return request.param, json.loads(request.param.read_text())


def test_configs_found():
    assert len({p.parent.parent.name for p in CONFIGS}) == 5, CONFIGS


def test_no_lambdas(config):
    path, content = config
    found = [(p, s) for p, s in _expressions(content) if LAMBDA.search(s)]
    assert not found, f"{path}: lambdas {found}; reference a named callable instead"


def test_no_positional_list_splicing(config):
    path, content = config
    found = [(p, s) for p, s in _expressions(content) if SLICE.search(s)]
    assert not found, f"{path}: slices {found}; give the pieces their own config lists and concatenate those"


def test_no_side_effect_chains_in_workflow_steps(config):
    path, content = config
    steps = [
        (f"{section}#{p}", s)
        for section in ("initialize", "finalize")
        for p, s in _expressions(content.get(section, []))
    ]
    found = [(p, s) for p, s in steps if CHAIN.search(s)]
    assert not found, f"{path}: and/or chains {found}; call a function that does the step"


def test_no_private_names(config):
    path, content = config
    found = [
        (p, s) for p, s in _strings(content) if (p.endswith("_target_") or s.startswith("$")) and PRIVATE.search(s)
    ]
    assert not found, f"{path}: private names {found}"


def test_no_old_nets_paths(config):
    path, content = config
    found = [(p, s) for p, s in _strings(content) if "shared_nets.nets" in s]
    assert not found, f"{path}: old shared_nets.nets paths {found}"


@pytest.mark.parametrize(
    "expression, rule",
    [
        ("$lambda x: x.unsqueeze(-1)", LAMBDA),
        ("$@a + @b[:-1] + @c + @b[-1:]", SLICE),
        ("$@handlers[: -3 if dist.get_rank() > 0 else None]", SLICE),
        ("$dist.is_initialized() and dist.barrier()", CHAIN),
        ("$dist.get_rank() > 0 or logging.info('x')", CHAIN),
        ("$shared_nets.engine._private(x)", PRIVATE),
    ],
)
def test_rules_catch_the_old_patterns(expression, rule):
    assert rule.search(expression)


@pytest.mark.parametrize("expression", ["$@lambda_dice * 2", "$[-175, 250]", "$@_meta_#network_data_format"])
def test_rules_spare_plain_names(expression):
    assert not LAMBDA.search(expression) and not PRIVATE.search(expression) and not SLICE.search(expression)
