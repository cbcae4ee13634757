"""ClipScope: sparse autoencoders on CLIP ViT-B/32 activations, and a browser for their features.

This package is the library both sides share (CLIP loading and hooks, the SAE, the database schema,
artifact storage, settings). It never imports ``backend`` or ``worker``.
"""

__version__ = "0.1.0"
