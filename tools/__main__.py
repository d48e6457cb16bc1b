"""Dispatcher for ``python -m tools <command> [--flag value ...]`` (python-fire per command).

Each command is a ``"module:function"`` string imported only when that command runs, so a light
command never imports the heavy dependencies of another. Adding a command is one line in
``COMMANDS``; the target may also be a dict of sub-commands (``text_embeddings add|show``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "resolve", "usage", "main"]

COMMANDS: dict[str, str] = {
    "bench": "tools.bench:main",
    "bench_deploy": "tools.bench:deploy_main",
    "bench_lite": "tools.bench:lite_main",
    "bench_sharded": "tools.bench_sharded:main",
    "compare": "tools.compare:main",
    "configs": "tools.configs:main",
    "demo": "tools.demo:main",
    "demo_data": "tools.demo_data:main",
    "deploy_app": "tools.deploy_app:main",
    "export": "tools.export:main",
    "few_shot": "tools.recipes.few_shot:few_shot",
    "init_model": "tools.init_model:main",
    "label_app": "tools.label_app:main",
    "nifti_to_dicom": "tools.nifti_to_dicom:main",
    "noise_var": "tools.recipes.few_shot:noise_var",
    "pacs": "tools.pacs:main",
    "prepare": "tools.prepare:main",
    "text_embeddings": "shared_nets.s_sam.text:cli",
    "weights": "tools.weights:main",
    "zero_shot": "tools.zero_shot:main",
}


def resolve(command: str) -> Callable | dict[str, Callable]:
    """Import and return the callable (or dict of sub-command callables) registered for ``command``.

    Args:
        command: a key of ``COMMANDS``.

    Returns:
        The command's entry function.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {sorted(COMMANDS)}, got {command!r}.")
    module, _, attr = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), attr or "main")


def usage() -> str:
    """The list of commands, one per line."""
    lines = ["usage: python -m tools <command> [--flag value ...]", "", "commands:"]
    lines += [f"  {name}" for name in sorted(COMMANDS)]
    lines += ["", "python -m tools <command> --help shows a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named by ``argv[0]`` with the remaining arguments.

    Args:
        argv: arguments after ``python -m tools`` (default ``sys.argv[1:]``).

    Returns:
        Exit status: 0 after a command or help, 2 for an unknown command.
    """
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}.\n{usage()}", file=sys.stderr)
        return 2
    fire.Fire(resolve(command), command=argv[1:], name=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
