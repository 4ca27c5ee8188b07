"""`python -m jobs.sample`: samples of a trained model, and the sampling every job shares."""
