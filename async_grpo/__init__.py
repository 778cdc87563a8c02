"""async-grpo: asynchronous GRPO training with paged-KV rollout workers and a DeepSpeed ZeRO learner."""

__version__ = "0.1.0"
