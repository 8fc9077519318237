"""sapo_jax: placeholder until its adapter issue lands."""
