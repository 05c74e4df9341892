"""Helpers shared by several test folders (on pytest's path: ``from support import ...``)."""
