"""InteriorFusion core: configs, storage, tracking, checkpoints, the stage contract and shared model ops."""
