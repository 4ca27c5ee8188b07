"""`python -m jobs.train_classifier`: the classifier of noisy latents for classifier guidance (App. D.4, LDM-8-G)."""
# python -m jobs.train_classifier source=runs/cin-ldm8 data.path=/data/imagenet/latents out_dir=classifiers/cin \
#     max_steps=300000
