"""Importing a training framework for an integration: a clear error when it is missing, and the
installed version checked against the range the integration was written and tested for.

>>> version_tuple("1.0.4.post1"), version_tuple("0.6.0rc2"), version_tuple("dev")
((1, 0, 4), (0, 6, 0), ())
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

__all__ = ["import_framework", "version_tuple"]


def version_tuple(version: str) -> tuple[int, ...]:
    """``(major, minor, patch)`` of a version string, ``()`` when it has none."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return () if match is None else tuple(int(p) for p in match.groups(default="0"))


def import_framework(
    integration: str,
    module: str,
    distribution: str,
    lowest: tuple[int, ...],
    below: tuple[int, ...],
) -> ModuleType:
    """Import ``module`` of the installed ``distribution``, whose version must be in
    ``[lowest, below)``.

    Raises:
        ModuleNotFoundError: the framework is not installed (the message names the integration,
            the distribution and the supported range).
        ImportError: the installed version is outside the supported range.

    >>> import_framework("demo", "no_such_framework_xyz", "no-such-framework", (1, 0), (2, 0))
    Traceback (most recent call last):
    ...
    ModuleNotFoundError: demo needs no-such-framework >=1.0,<2.0 (pip install "no-such-framework>=1.0,<2.0"); it is not installed
    """
    wanted = f">={'.'.join(map(str, lowest))},<{'.'.join(map(str, below))}"
    root = module.split(".")[0]
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != root:
            raise  # the framework is there but one of its own dependencies is not: say that
        raise ModuleNotFoundError(
            f'{integration} needs {distribution} {wanted} (pip install "{distribution}{wanted}"); '
            "it is not installed",
            name=root,
        ) from err
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(importlib.import_module(root), "__version__", ""))
    if not lowest <= version_tuple(version) < below:
        raise ImportError(f"{integration} supports {distribution} {wanted}; installed: {version!r}")
    return loaded
