"""InteriorFusion stage 2: the rectified-flow Structure DiT (its config schema so far; the model comes next)."""
