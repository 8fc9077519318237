"""``array_api_compat.torch`` as the namespace the reference's formula runs on, registered with
:func:`sapo_ref._xp.register_namespace` so that ``sapo_ref.evaluate``, ``sapo_ref.metrics`` and
``sapo_ref.validation`` run on tensors, eagerly and under ``torch.compile``.

Two overrides: ``expm1`` (:func:`sapo_torch._kernels.expm1`), because Inductor's CPU code emits
``exp(x) - 1``, which loses every digit of :math:`\\tau\\operatorname{expm1}(\\delta)` near
:math:`\\delta = 0` for a large :math:`\\tau`; ``isdtype``, which answers False for a dtype that is
not torch's (a NumPy string or object array passed by mistake) instead of raising, so that the
reference's checks name the argument. Registering also keeps array-api-compat's cached
type dispatch out of Dynamo's traces.

>>> import torch
>>> from sapo_ref._xp import namespace
>>> namespace(torch.zeros(1)) is TORCH
True
"""

from __future__ import annotations

import types
from typing import Any

import array_api_compat.torch as _compat
import torch

from sapo_ref._xp import register_namespace

from ._kernels import expm1

__all__ = ["TORCH", "is_tensor"]

TORCH = types.ModuleType("sapo_torch.xp", "array_api_compat.torch with a compile-exact expm1")
_PUBLIC = (*(k for k in vars(_compat) if not k.startswith("_")), "__array_namespace_info__")
TORCH.__dict__.update({k: getattr(_compat, k) for k in _PUBLIC})
TORCH.__array_api_version__ = _compat.__array_api_version__
TORCH.expm1 = expm1


def _isdtype(dtype: Any, kind: Any) -> bool:
    return isinstance(dtype, torch.dtype) and _compat.isdtype(dtype, kind)


TORCH.isdtype = _isdtype


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.Tensor`` (the predicate :data:`TORCH` is registered under)."""
    return isinstance(x, torch.Tensor)


register_namespace(is_tensor, TORCH)
