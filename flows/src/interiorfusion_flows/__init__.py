"""InteriorFusion flows and command line."""
