"""The first stage (Sec. 3.1, App. G): KL and VQ autoencoders, their blocks and config, and their training loss (LPIPS + patch discriminator)."""
