"""CLIP loading and the residual-stream hook site."""
