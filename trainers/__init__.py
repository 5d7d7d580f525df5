"""TRL-style trainers of hf-slim (distillation, elastic); filled by the distillation issue."""
