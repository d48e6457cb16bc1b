"""Command-line tools run from the checkout: ``python -m tools <command> ...``.

Not installed into site-packages (``setup.cfg`` packages only ``shared_nets``). Commands are
listed in ``tools.__main__.COMMANDS`` and imported only when called.
"""

from __future__ import annotations

__all__: list[str] = []
