"""InteriorFusion stage 4: LoRA fine-tuning on real scans (`lora`) and GRPO reinforcement fine-tuning with geometric
rewards (`grpo`). docs/finetune.md."""
