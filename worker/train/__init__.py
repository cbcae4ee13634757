"""SAE training: data order, the two recipes, checkpoints and the loop."""
