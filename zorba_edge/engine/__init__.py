"""The seeded zeroth-order engine: perturb, forward, perturb, forward, restore, update."""
