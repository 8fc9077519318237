"""sapo_autograd: a sapo-conformance driver plugin for HIPS autograd, and a SAPO port in it.

Installing this package adds the framework ``autograd`` to ``sapo-conformance`` through the
entry-point group ``sapo_conformance.drivers`` (see ``pyproject.toml``); the suite itself is not
edited. ``sapo_autograd.loss.policy_loss`` is the worked port it certifies::

    sapo-conformance --impl sapo_autograd.loss:policy_loss --framework autograd
"""

from __future__ import annotations

from .driver import AutogradDriver

__all__ = ["AutogradDriver"]
__version__ = "0.1.0"
