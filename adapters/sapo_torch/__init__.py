"""sapo_torch: placeholder until its adapter issue lands."""
