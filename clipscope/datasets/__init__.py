"""Image datasets behind one interface, selected by a :class:`clipscope.config.DatasetSpec`."""

from clipscope.datasets.base import ImageDataset, build_dataset

__all__ = ["ImageDataset", "build_dataset"]
