"""ImageNet weights for the torchvision backbones, from local files only.

`model.weights: imagenet` reads torchvision's published ImageNet-1k file for the backbone
(AlexNet, VGG16, ResNet50, DenseNet121: each `IMAGENET1K_V1`, the weights Keras' applications
also ship) from torchvision's own cache, `$TORCH_HOME/hub/checkpoints/<file>` (default
`~/.cache/torch/hub/checkpoints`), where `torchvision.models.<name>(weights=...)` would have put
it. Nothing is downloaded at run time: a missing file is an error naming the path to put it at,
the URL it comes from, and `tympan weights fetch <name>`, which downloads it on a machine with
internet. Every file is checked against the hash torchvision publishes in its file name (the
first hex digits of its sha256, `densenet121-a639ec97.pth`; torch.hub's `check_hash`
convention), so a damaged or substituted file is refused before it is loaded, and then loaded
with `weights_only=True`. A local file given by path is checked the same way when it carries a
published file name; any other file is taken as the user's own state dict.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlparse

import torch

IMAGENET = "imagenet"
# torchvision's weight enum per backbone; IMAGENET1K_V1 for all four
ENUMS = {
    "alexnet": "AlexNet_Weights",
    "vgg16": "VGG16_Weights",
    "resnet50": "ResNet50_Weights",
    "densenet121": "DenseNet121_Weights",
}
# torch.hub's convention: `<name>-<sha256 prefix>.<ext>`
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
# torchvision renamed DenseNet's layers after publishing its weights (`norm.1` -> `norm1`)
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_verified: dict[tuple[str, int, int], str] = {}


class WeightsError(ValueError):
    """A `model.weights` file that is missing, damaged or does not fit the backbone."""


def published_url(name: str) -> str:
    """The URL torchvision publishes `name`'s ImageNet weights at (read from its enum)."""
    if name not in ENUMS:
        raise WeightsError(
            f"model.weights={IMAGENET}: no published ImageNet weights for {name} "
            f"(torchvision backbones: {', '.join(ENUMS)})"
        )
    import torchvision

    return getattr(torchvision.models, ENUMS[name]).IMAGENET1K_V1.url


def file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def hash_prefix(url: str) -> str:
    """The sha256 prefix embedded in a published file name."""
    found = _HASH_IN_NAME.search(file_name(url))
    if found is None:
        raise WeightsError(f"{url}: no hash in the file name (expected <name>-<sha256 prefix>.pth)")
    return found.group(1)


def cache_dir() -> Path:
    """torchvision's cache folder for weights: `$TORCH_HOME/hub/checkpoints`."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(name: str) -> Path:
    """Where `name`'s ImageNet file is read from (and where `fetch` puts it)."""
    return cache_dir() / file_name(published_url(name))


def _fetch_hint(name: str, path: Path) -> str:
    return (
        f"nothing is downloaded at run time. On a machine with internet run `tympan weights "
        f"fetch {name}` (or download {published_url(name)}) and copy the file to {path}, or "
        f"set model.weights to the file's path"
    )


def verify(path: Path, prefix: str) -> None:
    """Refuse `path` unless its sha256 starts with `prefix` (a file is hashed once per
    process while its size and modification time stay the same)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _verified.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    if not digest.startswith(prefix):
        raise WeightsError(
            f"{path}: sha256 {digest[: len(prefix)]}... does not match the published "
            f"{prefix}: the file is damaged or not torchvision's; fetch it again"
        )
    _verified[key] = digest


def resolve(name: str, weights: str) -> Path:
    """The checked file `model.weights` names for backbone `name`: `imagenet` (torchvision's
    cache) or a path (checked when it carries a published file name)."""
    if weights == IMAGENET:
        path = cache_path(name)
        if not path.is_file():
            raise WeightsError(
                f"model.weights={IMAGENET}: {name}'s ImageNet weights are not at {path} "
                f"(torchvision's cache, $TORCH_HOME/hub/checkpoints); {_fetch_hint(name, path)}"
            )
        verify(path, hash_prefix(published_url(name)))
        return path
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"model.weights: {path} is not a file (weights are local only; `imagenet` reads "
            f"torchvision's cache)"
        )
    if name in ENUMS and path.name == file_name(published_url(name)):
        verify(path, hash_prefix(published_url(name)))
    return path


def load_state(name: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, with torchvision's published DenseNet keys renamed to its
    current layer names (as `torchvision.models.densenet121(weights=...)` does)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name.startswith("densenet"):
        for key in list(state):
            match = _DENSENET_KEY.match(key)
            if match:
                state[match.group(1) + match.group(2)] = state.pop(key)
    return state


def fetch(name: str) -> Path:
    """Download `name`'s ImageNet file into torchvision's cache and check its hash (needs
    internet; training never calls this)."""
    path = cache_path(name)
    if path.is_file():
        verify(path, hash_prefix(published_url(name)))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.hub.download_url_to_file(published_url(name), str(partial), progress=True)
    try:
        verify(partial, hash_prefix(published_url(name)))
    except WeightsError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path
