"""Generate `digits_vqa/`, the image + text data of the vision-language recipe, deterministically.

Run from anywhere: ``python recipes/data/generate_vqa.py`` (needs scikit-learn and Pillow). The
same seed writes byte-identical files, so the checked-in data can be regenerated and diffed.

The images are scikit-learn's handwritten digits (8x8, 17 grey levels; the diffusion recipe's
`data: digits`), upscaled with nearest-neighbour to 28, 32 or 36 pixels (the size varies on
purpose: the processor resizes, and batches of mixed sizes must collate). Train images come from
the digits' train split, test images from its held-out split, so no test image is seen in training.

Each row asks one question about one image, in TRL's vision SFT format: `images` (a list of paths
relative to this folder) and `messages` whose user turn holds an image placeholder
(``{"type": "image"}``) before the question; `prompt` and `completion` hold the same question and
answer for the eval stage. Questions: "Which digit is this?" (answer: the digit) and "Is it even?"
(yes / no).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
HERE = Path(__file__).resolve().parent / "digits_vqa"
TRAIN_IMAGES, TEST_IMAGES = 240, 60
SIZES = (28, 32, 36)
QUESTIONS = {
    "Which digit is this?": lambda d: str(d),
    "Is it even?": lambda d: "yes" if d % 2 == 0 else "no",
}


def _row(path: str, question: str, answer: str) -> dict:
    user = {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    return {"images": [path], "messages": [user, assistant], "prompt": question, "completion": answer}


def main() -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits()
    order = np.random.default_rng(0).permutation(len(raw.images))  # the split of tunelab.diffusion.pipelines.digits
    splits = {"train": order[:TRAIN_IMAGES], "test": order[1500 : 1500 + TEST_IMAGES]}
    rng = random.Random(SEED)
    for split, idx in splits.items():
        rows = []
        (HERE / split).mkdir(parents=True, exist_ok=True)
        for i in idx:
            size = rng.choice(SIZES)
            pixels = (raw.images[i] * (255 / 16)).round().astype("uint8")
            name = f"{split}/{int(i):04d}.png"
            Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST).save(HERE / name, optimize=True)
            digit = int(raw.target[i])
            rows += [_row(name, q, answer(digit)) for q, answer in QUESTIONS.items()]
        rng.shuffle(rows)
        with (HERE / f"{split}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
    assert not set(splits["train"]) & set(splits["test"])


if __name__ == "__main__":
    main()
