"""Built-in model families: one module or package per family (see docs/custom-models.md)."""
