"""Data layers: dataset layouts, volume reading/writing, synthetic dataset generators."""
