"""`python -m jobs.train_autoencoder`: the first stage under torch DDP."""
