"""Diffusion: image data, schedulers, pipelines, sampling, and the offline image-quality measure."""
