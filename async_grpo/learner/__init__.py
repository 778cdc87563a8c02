"""The learner: GRPO loss (loss.py), batching (batching.py), the DeepSpeed ZeRO engine (engine.py),
checkpoints (checkpoint.py) and full-weight export for broadcasts and HF checkpoints (weight_export.py).
Imports nothing from workers/; both sides share model/, transport/, config and advantages.py."""
