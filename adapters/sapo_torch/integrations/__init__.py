"""Drop-in integrations of the canonical loss into training frameworks.

Each submodule imports its framework only when it is imported itself (``import sapo_torch``
never imports TRL, verl, AReaL, ...), checks the framework's version at import and raises a
clear error for options it cannot reproduce exactly:

- :mod:`sapo_torch.integrations.trl`: TRL's ``GRPOTrainer`` with the canonical policy loss.
- :mod:`sapo_torch.integrations.verl`: the canonical losses in verl's policy-loss registry.

The porting guide (``docs/porting.md``) lists the thinner shims for the other frameworks.
"""
