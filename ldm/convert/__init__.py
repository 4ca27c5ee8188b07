"""Weight layouts from outside, as pure functions of configs and state dicts (no file I/O).

    compvis.py    CompVis checkpoints: split / join, LitEma names, strict loading
    unet.py       our UNet <-> diffusers' UNet2DConditionModel (SD-style cross-attention UNets)
    vae.py        our KL autoencoder <-> diffusers' AutoencoderKL
    bert.py       the released text encoder (x-transformers BERTEmbedder) <-> TextTransformer
    diffusers.py  a trained model as diffusers components (UNet, VAE, scheduler config)
"""
