"""Fréchet distance between generated and real images in a tunelab-trained classifier's feature space.

predictions: generated images; references: held-out real images (PIL, same count, as evaluate
requires); classifier: folder written by `tunelab.diffusion.quality.train_classifier`. Also reports
the classifier's mean confidence on the generated images and how evenly they spread over classes.
See tunelab/diffusion/quality.py for why this and not Inception FID.
"""

from pathlib import Path

import datasets
import evaluate


class FrechetDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Frechet distance of classifier features (generated vs real), confidence, class spread.",
            citation="Heusel et al. 2017, GANs Trained by a Two Time-Scale Update Rule (FID), with a task classifier.",
            inputs_description="predictions: generated images; references: real images; classifier: folder",
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references, classifier=None):
        from tunelab.diffusion.quality import load_classifier, quality, to_batch

        if classifier is None:
            raise ValueError("frechet_distance needs classifier=FOLDER (tunelab.diffusion.quality.train_classifier)")
        net, config = load_classifier(Path(classifier))
        size, channels = config["resolution"], config["channels"]
        return quality(net, to_batch(predictions, size, channels), to_batch(references, size, channels))
