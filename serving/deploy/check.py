"""The check run after each deploy step: classify known CIFAR-10 test images through a label.

It proves that the label answers, from the expected version, with sane outputs: probabilities of the right shape,
finite, in [0, 1], rows summing to 1, the same through both signatures (uint8 pixels and encoded PNG bytes), and a
signature_def that still has the contract's inputs and outputs. Accuracy on the few images is reported, and only
enforced with `--min-accuracy` (a tiny test model is barely better than chance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client import contract
from client.preprocessing import load_image, to_model_input
from client.tfserving import ModelServerClient

CHECK_IMAGES = Path(__file__).resolve().parent.parent / "deploy_check"
AGREEMENT = 0.02  # max |p_pixels - p_bytes|: both paths decode the same PNG to the same pixels


class CheckFailed(Exception):
    pass


class LabelMismatch(CheckFailed):
    """The label answered from another version (a polling server may not have reloaded yet)."""

    def __init__(self, label: str, expected: int, got: int) -> None:
        super().__init__(f"label {label} answered from version {got}, expected {expected}")
        self.label, self.expected, self.got = label, expected, got


@dataclass(frozen=True)
class CheckImages:
    names: list[str]
    encoded: list[bytes]
    pixels: np.ndarray  # uint8 [N, 32, 32, 3]
    class_ids: np.ndarray  # int [N]

    @staticmethod
    def load(folder: Path = CHECK_IMAGES) -> CheckImages:
        """PNG files named `<anything>_<class name>.png` (the class is the last `_` part)."""
        files = sorted(folder.glob("*.png"))
        if not files:
            raise CheckFailed(f"no check images (*.png) in {folder}")
        names, encoded, ids = [], [], []
        for f in files:
            cls = f.stem.rsplit("_", 1)[-1]
            if cls not in contract.CLASS_NAMES:
                raise CheckFailed(f"{f.name}: the name must end with _<class>, one of {contract.CLASS_NAMES}")
            names.append(f.name)
            encoded.append(f.read_bytes())
            ids.append(contract.CLASS_NAMES.index(cls))
        pixels = to_model_input([load_image(b) for b in encoded])
        return CheckImages(names, encoded, pixels, np.asarray(ids))


@dataclass(frozen=True)
class CheckResult:
    label: str
    version: int
    accuracy: float
    max_disagreement: float

    def as_dict(self) -> dict:
        return {"label": self.label, "version": self.version, "accuracy": round(self.accuracy, 4),
                "max_disagreement": round(self.max_disagreement, 6)}


def _sane(probabilities: np.ndarray, n: int, what: str) -> None:
    p = np.asarray(probabilities)
    if p.shape != (n, len(contract.CLASS_NAMES)):
        raise CheckFailed(f"{what}: probabilities of shape {p.shape}, expected {(n, len(contract.CLASS_NAMES))}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise CheckFailed(f"{what}: probabilities outside [0, 1] or not finite")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise CheckFailed(f"{what}: probability rows do not sum to 1 ({p.sum(axis=1).round(4).tolist()})")


def check_signatures(metadata: dict) -> None:
    """The signature_def still offers the contract's signatures, inputs and outputs."""
    text = repr(metadata)
    for needed in (contract.IMAGES_SIGNATURE, contract.PIXELS_INPUT, contract.BYTES_INPUT, contract.PROBABILITIES):
        if needed not in text:
            raise CheckFailed(f"the model metadata lacks {needed!r}")


def check_label(
    client: ModelServerClient,
    label: str,
    expected_version: int,
    images: CheckImages,
    *,
    min_accuracy: float = 0.0,
    timeout: float | None = None,
) -> CheckResult:
    n = len(images.names)
    by_pixels = client.predict_pixels(images.pixels, label=label, timeout=timeout)
    if by_pixels.version != expected_version:
        raise LabelMismatch(label, expected_version, by_pixels.version)
    _sane(by_pixels.probabilities, n, f"{label} (pixels)")
    by_bytes = client.predict_encoded(images.encoded, label=label, timeout=timeout)
    if by_bytes.version != expected_version:
        raise LabelMismatch(label, expected_version, by_bytes.version)
    _sane(by_bytes.probabilities, n, f"{label} (encoded bytes)")
    disagreement = float(np.abs(np.asarray(by_pixels.probabilities) - np.asarray(by_bytes.probabilities)).max())
    if disagreement > AGREEMENT:
        raise CheckFailed(f"{label}: the two signatures disagree by {disagreement:.4f} on the same images")
    check_signatures(client.metadata(label=label))
    accuracy = float(np.mean(np.argmax(by_pixels.probabilities, axis=1) == images.class_ids))
    if accuracy < min_accuracy:
        raise CheckFailed(f"{label}: accuracy {accuracy:.2f} on the check images is below {min_accuracy:.2f}")
    return CheckResult(label, expected_version, accuracy, disagreement)
