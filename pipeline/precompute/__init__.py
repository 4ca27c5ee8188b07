"""Precompute: image shards -> latent shards with a frozen autoencoder, on Ray."""
