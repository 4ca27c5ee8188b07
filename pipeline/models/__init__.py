"""Trained and pretrained models in and out of files: weights, autoencoders, text encoders, training checkpoints, the LDM bundle."""
