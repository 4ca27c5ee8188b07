"""Patch discriminator of the first-stage GAN loss (Sec. 3.1, Eq. 25; VQGAN, pix2pix).

A fully convolutional PatchGAN (Isola et al. 2017): every output logit judges one
overlapping image patch (70x70 pixels for 3 layers), which pushes the decoder
towards locally realistic texture instead of the blur an L1/L2 loss alone gives.
Layer order and names follow taming-transformers' NLayerDiscriminator
(`main.0.weight`, ...), so the `loss.discriminator.*` entries of released
checkpoints load as they are.
"""
import torch
from torch import nn

KERNEL_SIZE, PADDING = 4, 1
MAX_CHANNEL_MULT = 8


def _init_weights(module: nn.Module) -> None:
    """DCGAN init as in pix2pix: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """x [B, in_channels, H, W] -> patch logits [B, 1, h, w].

    `num_layers` stride-2 downsamplings (the last one of them at stride 1): Tab. 8's
    presets use 3 (default) or 2. Convolutions followed by BatchNorm carry no bias.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if in_channels <= 0 or base_channels <= 0 or num_layers < 1:
            raise ValueError(f"in_channels={in_channels}, base_channels={base_channels}, "
                             f"num_layers={num_layers}: need positive channels and num_layers >= 1")
        layers = [nn.Conv2d(in_channels, base_channels, KERNEL_SIZE, 2, PADDING),
                  nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev_mult, mult = mult, min(2 ** n, MAX_CHANNEL_MULT)
            stride = 2 if n < num_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(base_channels * prev_mult, base_channels * mult, KERNEL_SIZE,
                                 stride, PADDING, bias=False),
                       nn.BatchNorm2d(base_channels * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(base_channels * mult, 1, KERNEL_SIZE, 1, PADDING))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.main(x_BCHW)
