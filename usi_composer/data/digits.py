"""The embedded demo's data: scikit-learn's handwritten digits (ships inside the package).

1,797 real 8x8 grayscale scans of the digits 0-9, upscaled and written as RGB PNGs in the
ImageNet folder layout, so the demo trains through exactly the ImageNet code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["export_digits"]

_MARKER = "digits.json"


def export_digits(root: str | Path, image_size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png`` (a stratified split).

    Idempotent: a complete export with the same settings is reused.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    settings = {"image_size": image_size, "val_fraction": val_fraction, "seed": seed}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    idx_train, idx_val = train_test_split(
        np.arange(len(images)), test_size=val_fraction, stratify=digits.target, random_state=seed
    )
    for split, indices in (("train", idx_train), ("val", idx_val)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((image_size, image_size), Image.BICUBIC)
            img.convert("RGB").save(folder / f"{i:04d}.png")
    marker.write_text(json.dumps(settings))  # written last: its presence means the export is complete
    return root
