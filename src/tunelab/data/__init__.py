"""Datasets for stages: `data:` sections as `datasets.load_dataset` arguments, and the column checks."""
