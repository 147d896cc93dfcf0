"""InteriorFusion stage 3: the Material DiT (its config schema so far; the model comes next) and the export of
per-voxel PBR materials (`export`: textured .glb, glTF validation, preview sheets)."""
