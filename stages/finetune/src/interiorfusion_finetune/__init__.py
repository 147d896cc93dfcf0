"""InteriorFusion stage 4: LoRA and GRPO fine-tuning (their config schemas so far; the trainers come next)."""
