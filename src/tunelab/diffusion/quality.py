"""Offline image quality: Fréchet distance in the feature space of a small classifier tunelab trains.

FID needs an Inception network from the Internet and means little on 16x16 greyscale digits.
Here the feature extractor is a four-layer CNN trained on the *same* dataset's labelled training
images (seconds on a CPU for the digits); its 32-d penultimate features of generated images are
compared with those of held-out real images:

- ``frechet_distance``: ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^1/2), lower is better;
- ``confidence``: the classifier's mean top-class probability on generated images (do they look
  like *some* class?);
- ``class_entropy``: entropy of the predicted-class histogram over log(number of classes)
  (1 = every class equally often; low = mode collapse); ``classes_covered`` counts the classes seen.

The classifier is saved as a folder (config.json + model.safetensors) and reused by path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.diffusion.pipelines import to_tensor

CLASSIFIER_CONFIG = "tunelab_image_classifier.json"


def train_classifier(images, labels: list[int], out_dir: Path, seed: int, epochs: int = 12) -> dict[str, Any]:
    """Train the feature network on (N, C, H, W) images in [-1, 1]; save it to `out_dir`."""
    import torch
    from safetensors.torch import save_file

    from tunelab.diffusion.classifier import ImageClassifier

    torch.manual_seed(seed)
    num_classes = max(labels) + 1
    net = ImageClassifier(images.shape[1], num_classes)
    y = torch.tensor(labels)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(y) + 63) // 64))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 64):
            idx = order[start : start + 64]
            x = images[idx]
            x = x + 0.05 * torch.randn(x.shape, generator=gen)  # small noise: features robust to sampler grain
            loss = torch.nn.functional.cross_entropy(net(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "channels": int(images.shape[1]),
        "resolution": int(images.shape[-1]),
        "num_classes": num_classes,
        "train_examples": len(y),
        "epochs": epochs,
        "seed": seed,
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out_dir / "model.safetensors")
    (out_dir / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=2))
    return config


def load_classifier(folder: Path):
    from safetensors.torch import load_file

    from tunelab.diffusion.classifier import ImageClassifier

    config = json.loads((folder / CLASSIFIER_CONFIG).read_text())
    net = ImageClassifier(config["channels"], config["num_classes"])
    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval(), config


def features(net, images, batch: int = 256):
    """(penultimate features, class probabilities) for (N, C, H, W) images in [-1, 1]."""
    import torch

    feats, probs = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            f = net.features(images[start : start + batch])
            feats.append(f.double())
            probs.append(net.head(f).softmax(-1).double())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def frechet(a, b) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` and of `b`."""
    import numpy as np
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)  # scipy 1.16 deprecated `disp` (and its error estimate)
    if not np.isfinite(root).all():  # near-singular product: regularise as the FID reference code does
        eye = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def quality(net, generated, real) -> dict[str, float]:
    """The measures of this module for tensors of generated and real images."""
    import numpy as np

    fg, pg = features(net, generated)
    fr, _ = features(net, real)
    counts = np.bincount(pg.argmax(-1), minlength=pg.shape[1])
    share = counts[counts > 0] / counts.sum()
    return {
        "frechet_distance": frechet(fg, fr),
        "confidence": float(pg.max(-1).mean()),
        "class_entropy": float(-(share * np.log(share)).sum() / np.log(pg.shape[1])),
        "classes_covered": float((counts > 0).sum()),
    }


def to_batch(images: list, resolution: int, channels: int):
    """PIL images -> (N, C, H, W) float tensor in [-1, 1] at the classifier's size."""
    import torch

    return torch.stack([to_tensor(im, resolution, channels) for im in images])
