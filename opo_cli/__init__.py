"""opo: RL fine-tuning of causal LMs with Orthogonalized Policy Optimization and its baselines."""

__version__ = "0.1.0"
