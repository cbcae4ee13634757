"""The GPU worker: pipeline stages (extract, train), datasets and the training loop. Uses ``clipscope`` only."""
