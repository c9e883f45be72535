"""Inference loops MONAI's engines lack (per-case failure isolation for batch jobs) and their per-case outputs."""
