"""Writes data/digits.npz: the UCI optdigits 8x8 images with a fixed stratified split.

Run once by the maintainers (it needs scikit-learn, which is not a dependency of the project):

    python data/make_digits.py

Source: the 1797 8x8 images of handwritten digits, 17 grey levels (0-16), from the UCI Machine
Learning Repository "Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak, 1998),
CC BY 4.0, in the copy distributed with scikit-learn (`sklearn.datasets.load_digits`).
The test split holds 30 images of each class, drawn with numpy seed 0; it never changes.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

N_TEST_PER_CLASS = 30


def main():
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.uint8)
    assert images.max() == 16 and images.shape == (1797, 8, 8)
    rng = np.random.default_rng(0)
    test = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(labels == c), N_TEST_PER_CLASS, replace=False) for c in range(10)
    ]))
    out = Path(__file__).with_name("digits.npz")
    np.savez_compressed(out, images=images, labels=labels, test_index=test.astype(np.int16))
    print(f"wrote {out}: {len(images)} images, {len(test)} in the test split")


if __name__ == "__main__":
    main()
