"""InteriorFusion data stage."""
