from interiorfusion_core.cli import module_main

module_main("evaluate")
