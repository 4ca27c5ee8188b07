"""`python -m jobs.export`: a trained model in our, diffusers' and CompVis' layouts."""
