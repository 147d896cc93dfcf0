"""InteriorFusion stage 3: the Material DiT (its config schema so far; the model comes next)."""
