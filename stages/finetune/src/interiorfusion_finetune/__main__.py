"""`python -m interiorfusion_finetune {lora,grpo} --config …`: the package runs the fine-tuning stages. In their images
(interiorfusion/lora, interiorfusion/grpo) the stage comes from INTERIORFUSION_STAGE, so they take the same
arguments as every other stage image."""

import os
import sys

from interiorfusion_core.cli import module_main

STAGES = ("lora", "grpo")

if len(sys.argv) > 1 and sys.argv[1] in STAGES:
    stage = sys.argv.pop(1)
elif os.environ.get("INTERIORFUSION_STAGE") in STAGES:
    stage = os.environ["INTERIORFUSION_STAGE"]
else:
    sys.exit(f"usage: python -m interiorfusion_finetune {{{','.join(STAGES)}}} --config FILE …")
module_main(stage)
