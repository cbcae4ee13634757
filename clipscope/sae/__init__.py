"""The TopK sparse autoencoder, its on-disk format and its metrics."""

from clipscope.sae.model import SparseCode, TopKSAE

__all__ = ["SparseCode", "TopKSAE"]
