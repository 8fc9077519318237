"""sapo_conformance: placeholder until the conformance issue lands."""
