"""`python -m interiorfusion_data --config … --output …`: the data stage (container entry point)."""

from interiorfusion_core.cli import module_main

module_main("data")
