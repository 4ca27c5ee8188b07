"""The Inception-v3 feature extractor of FID / IS / KID / precision-recall: torch-fidelity's own.

We use torch-fidelity's `inception-v3-compat` network unchanged (the TF-1.x graph of the FID paper,
ported with its TF-exact bilinear resize to 299^2), so our features are its features by
construction. Only the weights are found and read here, because torch-fidelity's loader unpickles
whatever file it is given (`torch.load(weights_only=False)`): we read the file with
`weights_only=True` (tensors only; a tampered file cannot run code), let torch-fidelity build its
network on the meta device from a data-free skeleton we serialised ourselves, then assign the
tensors.

Where the weights come from, in order: `weights_path` (a local copy, for machines without network),
torch-fidelity's own download location (torch hub's cache, `$TORCH_HOME/hub/checkpoints/`), or a
download to that location when `allow_download` is set. The file's sha256 goes into every
evaluation protocol: statistics made with other weights are not comparable.
"""
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from pipeline.models.weights import find_weights_file

FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name of this network
WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
# torch-fidelity's default feature layer per metric: 2048-d pool features for FID, KID and (our
# choice, as in Kynkaanniemi et al.) precision-recall; the logits without the fc bias for IS.
FEATURES_2048, LOGITS = "2048", "logits_unbiased"


@dataclass
class InceptionConfig:
    """The `inception` group of jobs.fid_stats and jobs.evaluate."""
    weights_path: str | None = None  # a local copy of WEIGHTS_FILENAME; None: torch-fidelity's location
    allow_download: bool = True      # fetch it there (rank 0) when missing; false on machines without network
    batch_size: int = 50             # images per Inception forward

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"inception.batch_size={self.batch_size}: must be >= 1")


def default_weights_path() -> Path:
    """Where torch-fidelity's own download puts the weights (torch hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _download(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise ValueError(f"could not download the Inception weights from {URL_INCEPTION_V3} ({err}): "
                         f"{_where_to_put_them(path)}") from err


def _where_to_put_them(path: Path) -> str:
    return (f"put torch-fidelity's {WEIGHTS_FILENAME} at {path} (its default download location), or set "
            f"inception.weights_path to a local copy of it")


def find_inception_weights(weights_path: str | None = None, allow_download: bool = False) -> Path:
    """weights_path if given, else torch-fidelity's download location (downloading there first
    when allowed); ValueError naming both options when neither has the file."""
    path = default_weights_path()
    return find_weights_file(
        weights_path, "inception.weights_path", f"a copy of torch-fidelity's {WEIGHTS_FILENAME}", path,
        _download if allow_download else None,
        f"FID/IS/KID need torch-fidelity's Inception weights and none were found: {_where_to_put_them(path)}, "
        f"or set inception.allow_download=true on a machine with network access")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _skeleton(state_dict: dict) -> io.BytesIO:
    """The weights' names and shapes without their data (meta tensors), serialised by us: the only
    bytes torch-fidelity's loader unpickles. The real tensors are assigned afterwards."""
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError("the Inception weights file must hold a state dict of tensors (torch-fidelity's "
                         f"{WEIGHTS_FILENAME} format)")
    buffer = io.BytesIO()
    torch.save({k: torch.empty_like(v, device="meta") for k, v in state_dict.items()}, buffer)
    buffer.seek(0)
    return buffer


def load_inception(weights_path: str | None = None, allow_download: bool = False,
                   device: str | torch.device = "cpu") -> tuple[FeatureExtractorInceptionV3, dict]:
    """torch-fidelity's Inception (eval, frozen, on `device`) returning (2048-d features, logits),
    and its identity for the protocol: {"feature_extractor", "weights_file", "weights_sha256",
    "torch_fidelity"}."""
    path = find_inception_weights(weights_path, allow_download)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    try:
        with torch.device("meta"):  # torch-fidelity's own constructor and key check, on shapes only
            extractor = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, [FEATURES_2048, LOGITS],
                                                    feature_extractor_weights_path=_skeleton(state_dict))
    except RuntimeError as err:  # load_state_dict: missing / unexpected keys or wrong shapes
        raise ValueError(f"{path} is not torch-fidelity's Inception-v3 ({WEIGHTS_FILENAME}): {err}") from err
    extractor.load_state_dict(state_dict, assign=True)
    extractor = extractor.to(device, extractor.feature_extractor_internal_dtype).requires_grad_(False).eval()
    identity = {"feature_extractor": FEATURE_EXTRACTOR, "weights_file": path.name,
                "weights_sha256": file_sha256(path), "torch_fidelity": torch_fidelity.__version__}
    return extractor, identity
