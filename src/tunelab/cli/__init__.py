"""The `tunelab` command: a thin layer over the Python API (`tunelab.cli.app`)."""

from tunelab.cli.app import app, main

__all__ = ["app", "main"]
