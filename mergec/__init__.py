"""mergec: merge trained networks without training."""
