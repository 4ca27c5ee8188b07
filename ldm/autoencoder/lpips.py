"""LPIPS, the learned perceptual distance of Zhang et al. 2018, VGG16 variant (v0.1).

The perceptual term of the first-stage objective (Sec. 3.1, Eq. 25, App. G):

    d(x, y) = sum_l  mean_hw  w_l . (f_l(x) - f_l(y))^2

with f_l the channel-unit-normalised VGG16 activations at relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3 of the shifted/scaled input, and w_l >= 0 the learned
1x1 "linear heads" (lin0..lin4).

This module holds no weights of its own: `LPIPS()` is randomly initialised and
`load_state_dicts(vgg_sd, heads_sd)` takes state dicts the caller has already
read (pipeline/models/weights.py finds the files). Parameter names follow the
reference implementation (`scaling_layer.*`, `net.sliceK.I.*`, `linK.model.1.weight`),
so the `loss.perceptual_loss.*` entries of CompVis checkpoints load as they are.
"""
import torch
from torch import nn

# torchvision's vgg16().features up to relu5_3: channels per conv, "M" = 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Index ranges of `features` whose outputs are relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
FEATURE_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_layers() -> list[nn.Module]:
    """torchvision's `features` layers 0..29, so layer i here is `features.i` there."""
    layers, in_channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = item
    return layers


class ScalingLayer(nn.Module):
    """Maps inputs in [-1, 1] to the ImageNet statistics VGG was trained on (LPIPS v0.1)."""

    def __init__(self):
        super().__init__()
        # The reference constants: ImageNet mean/std expressed in the [-1, 1] range.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return (x_BCHW - self.shift) / self.scale


class VGG16Features(nn.Module):
    """VGG16 conv trunk cut into five slices; forward returns the five ReLU outputs."""

    def __init__(self):
        super().__init__()
        layers = _vgg16_layers()
        for k, (start, stop) in enumerate(SLICE_BOUNDS, start=1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), layers[i])  # keep torchvision's index as the name
            self.add_module(f"slice{k}", block)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG init, so random features are O(1)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        features, h = [], x_BCHW
        for k in range(1, len(SLICE_BOUNDS) + 1):
            h = getattr(self, f"slice{k}")(h)
            features.append(h)
        return features


class LinearHead(nn.Module):
    """The learned 1x1 weighting w_l of one layer; dropout in front as in LPIPS (off in eval)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(in_channels, 1, 1, bias=False))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model(x_BCHW)


def normalize_channels(f_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise every feature vector along channels (LPIPS Eq. 1).

    vector_norm has a zero (not NaN) gradient at an all-zero vector, which ReLU features hit.
    """
    return f_BCHW / (torch.linalg.vector_norm(f_BCHW, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between image batches in [-1, 1]: forward(x, y) -> [B].

    Always frozen and in eval mode (dropout off), yet differentiable w.r.t. its inputs,
    which is what the reconstruction loss of Eq. 25 needs.
    """

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, channels in enumerate(FEATURE_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # A parent's .train() must not switch the heads' dropout on: LPIPS is a fixed metric.
        return super().train(False)

    def load_state_dicts(self, vgg_state_dict: dict[str, torch.Tensor],
                         heads_state_dict: dict[str, torch.Tensor]) -> "LPIPS":
        """Load torchvision VGG16 weights (`features.I.*`; `classifier.*` is ignored) and the
        LPIPS linear heads (`linK.model.1.weight`, the lpips package's `weights/v0.1/vgg.pth`)."""
        self.net.load_state_dict(_vgg_to_slices(vgg_state_dict))
        heads = {k: v for k, v in heads_state_dict.items() if k.startswith("lin")}
        missing = sorted({f"lin{k}.model.1.weight" for k in range(5)} - set(heads))
        if missing:
            raise ValueError(f"LPIPS heads state dict lacks {missing}: pass the lpips package's "
                             f"weights/v0.1/vgg.pth (keys lin0..lin4.model.1.weight)")
        for k in range(5):
            weight = heads[f"lin{k}.model.1.weight"]
            getattr(self, f"lin{k}").load_state_dict({"model.1.weight": weight})
        return self

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B]; both inputs [B, 3, H, W] in [-1, 1]."""
        if x_BCHW.shape != y_BCHW.shape or x_BCHW.ndim != 4 or x_BCHW.shape[1] != 3:
            raise ValueError(f"LPIPS needs two RGB batches [B, 3, H, W] of one shape, got "
                             f"{list(x_BCHW.shape)} and {list(y_BCHW.shape)}")
        feats_x = self.net(self.scaling_layer(x_BCHW))
        feats_y = self.net(self.scaling_layer(y_BCHW))
        dist_B = x_BCHW.new_zeros(x_BCHW.shape[0])
        for k, (f_x, f_y) in enumerate(zip(feats_x, feats_y)):
            diff_BCHW = (normalize_channels(f_x) - normalize_channels(f_y)).square()
            dist_B = dist_B + getattr(self, f"lin{k}")(diff_BCHW).mean(dim=(1, 2, 3))
        return dist_B


def _vgg_to_slices(vgg_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision keys `features.I.{weight,bias}` (or bare `I.*`) -> `sliceK.I.*`."""
    out = {}
    for key, value in vgg_state_dict.items():
        if key.startswith("classifier."):
            continue
        index, _, param = key.removeprefix("features.").partition(".")
        if not index.isdigit() or int(index) >= SLICE_BOUNDS[-1][1]:
            continue  # layers past relu5_3 (none carry weights in VGG16) or foreign keys
        k = next(k for k, (start, stop) in enumerate(SLICE_BOUNDS, 1) if start <= int(index) < stop)
        out[f"slice{k}.{index}.{param}"] = value
    if len(out) != 26:  # 13 convs x (weight, bias)
        raise ValueError(f"expected torchvision vgg16 weights (26 conv tensors under "
                         f"'features.'), found {len(out)}: pass the state dict of "
                         f"vgg16-397923af.pth or torchvision.models.vgg16().state_dict()")
    return out
