"""InteriorFusion stage 1: the SLAT-Interior sparse VAE."""
