"""Drop-in integrations of the canonical loss into training frameworks.

Each submodule imports its framework only when it is imported itself (``import sapo_torch``
never imports TRL, verl, AReaL, ...), checks the framework's version at import (a missing
framework is a ``ModuleNotFoundError`` naming it, another version an ``ImportError`` stating the
supported range) and raises a clear error for options it cannot reproduce exactly:

- :mod:`sapo_torch.integrations.trl`: ``SapoGRPOTrainer``, TRL's ``GRPOTrainer`` with the
  canonical policy loss (a one-line switch).
- :mod:`sapo_torch.integrations.verl`: the canonical losses in verl's policy-loss registry
  (``loss_mode=sapo_ref_sapo`` etc.; registered by ``import verl`` through the entry point).
- :mod:`sapo_torch.integrations.areal`: ``install()`` puts ``sapo_loss_fn`` into AReaL's actor.
- :mod:`sapo_torch.integrations.trinity`: ``SapoRefPolicyLossFn``, registered as ``sapo_ref``.
- :mod:`sapo_torch.integrations.liger`: ``SapoFusedLinearLoss``, Liger's fused-linear GRPO
  interface with gradient-carrying chunked log-probabilities.
- :mod:`sapo_torch.integrations.swift`: ``SapoRefGRPOTrainer`` for ms-swift.
- :mod:`sapo_torch.integrations.torchforge`: ``SapoRefLoss`` (untested: torchforge's loss code
  has no installable release).

Guides: ``docs/integrations/trl.md``, ``docs/integrations/verl.md`` and ``docs/porting.md``.
"""
