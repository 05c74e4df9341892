"""Loaders for the real models and data that ship inside packages (all offline)."""
