"""The one exception type of :mod:`ltc.data`."""

from __future__ import annotations

__all__ = ["ACCEPTED_SOURCES", "DataError"]

ACCEPTED_SOURCES = (
    "accepted sources: 'digits' (bundled scikit-learn digits), a CIFAR-10 'cifar-10-batches-py' folder or "
    "'cifar-10-python.tar.gz', an image folder 'root/<class>/*.jpg|jpeg|png|bmp' as a directory or .zip, "
    "or a MedMNIST-style .npz (train_images, train_labels, val_images, val_labels[, test_*])"
)


class DataError(ValueError):
    """A data source is missing, malformed or corrupt; the message names the file and the fix."""
