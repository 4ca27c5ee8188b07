"""Finding and reading pretrained weights for the model library (ldm/ itself reads no files).

Every file goes through `load_state_dict`: safetensors, or `torch.load(weights_only=True)`,
which refuses arbitrary pickled objects, so a tampered checkpoint cannot run code.
"""
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.autoencoder.lpips import LPIPS

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (VGG16_Weights.IMAGENET1K_V1)
VGG16_HASH_PREFIX = "397923af"         # torchvision names its files by their sha256 prefix
LPIPS_HEADS_IN_PACKAGE = Path("weights", "v0.1", "vgg.pth")  # shipped by the `lpips` package


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch checkpoint loaded with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    return torch.load(path, weights_only=True, map_location="cpu")


def default_vgg16_path() -> Path:
    """Where torchvision's own download puts the VGG16 weights (torch hub's cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def lpips_package_heads_path() -> Path | None:
    """The linear heads inside an installed `lpips` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / LPIPS_HEADS_IN_PACKAGE
    return path if path.is_file() else None


def find_weights_file(given: str | None, key: str, what: str, default: Path,
                      download: Callable[[Path], None] | None, missing: str) -> Path:
    """The weights file a user named (`key`=given; ValueError naming `what` belongs there when it is
    not a file), else `default`, fetched there first by `download(default)` when that is given;
    ValueError(missing) when neither has it."""
    if given is not None:
        if not Path(given).is_file():
            raise ValueError(f"{key}={given!r} is not a file: point it at {what}")
        return Path(given)
    if not default.is_file() and download is not None:
        download(default)
    if not default.is_file():
        raise ValueError(missing)
    return default


def find_vgg16_weights(vgg_path: str | None = None, allow_download: bool = False) -> Path:
    """vgg_path if given, else torch hub's cache; with allow_download, fetch it there first."""
    path = default_vgg16_path()
    return find_weights_file(
        vgg_path, "vgg_path", f"torchvision's {VGG16_FILENAME} (or a .safetensors copy of it)", path,
        _download_vgg16 if allow_download else None,
        f"LPIPS needs torchvision's ImageNet VGG16 weights: put {VGG16_FILENAME} at {path}, or set vgg_path "
        f"to a local copy, or pass allow_download=True on a machine with network access")


def _download_vgg16(path: Path) -> None:
    from torchvision.models import (
        VGG16_Weights,  # only users who ask for a download need it
    )

    url = VGG16_Weights.IMAGENET1K_V1.url
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), hash_prefix=VGG16_HASH_PREFIX)


def find_lpips_heads(heads_path: str | None = None) -> Path:
    """heads_path if given, else the `lpips` package's weights/v0.1/vgg.pth."""
    if heads_path is not None:
        if not Path(heads_path).is_file():
            raise ValueError(f"heads_path={heads_path!r} is not a file: point it at the LPIPS "
                             f"v0.1 VGG linear heads (lpips package: {LPIPS_HEADS_IN_PACKAGE})")
        return Path(heads_path)
    path = lpips_package_heads_path()
    if path is None:
        raise ValueError("LPIPS needs its learned linear heads: `pip install lpips` (it ships "
                         f"{LPIPS_HEADS_IN_PACKAGE}), or set heads_path to a copy of that file")
    return path


def load_lpips(vgg_path: str | None = None, heads_path: str | None = None,
               allow_download: bool = False) -> LPIPS:
    """The real LPIPS-VGG (frozen, eval mode, on the CPU) from files found as above."""
    vgg_state_dict = load_state_dict(find_vgg16_weights(vgg_path, allow_download))
    heads_state_dict = load_state_dict(find_lpips_heads(heads_path))
    return LPIPS().load_state_dicts(vgg_state_dict, heads_state_dict)


def load_lpips_or_explain(vgg_path: str | None, heads_path: str | None, alternative: str) -> LPIPS:
    """load_lpips for a job whose keys are lpips_vgg_path / lpips_heads_path: a ValueError names those
    keys and `alternative` (what to set instead, e.g. "set lpips=false to score FID only")."""
    try:
        return load_lpips(vgg_path, heads_path)
    except ValueError as err:
        message = str(err).replace("vgg_path", "lpips_vgg_path").replace("heads_path", "lpips_heads_path")
        raise ValueError(f"{message}; or {alternative}") from None
