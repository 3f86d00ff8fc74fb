"""Arus entry points: the `arus` command and the assembly of each service."""
