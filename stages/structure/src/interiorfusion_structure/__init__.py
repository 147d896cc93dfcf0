"""InteriorFusion stage 2: the rectified-flow Structure DiT (docs/structure.md). The backbone (`dit`, `attention`),
condition encoders (`conditions`), flow law and samplers (`flow`) are a library stages 3 and 4 import."""
