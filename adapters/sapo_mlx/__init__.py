"""sapo_mlx: placeholder until its adapter issue lands."""
