"""synergen core: configuration, lake I/O, model, RQ-VAE, training, metrics, retrieval, tracking."""
