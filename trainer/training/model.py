"""SE-DenseNet: DenseNet-BC with a squeeze-and-excitation block in every dense layer.

Module and parameter names follow torchvision's ``densenet.py`` exactly, so with ``se=False``
a torchvision DenseNet state dict loads strictly and gives the same outputs. The SE block
(``denselayerN.se.fc1/fc2``) rescales each layer's k new maps before they are concatenated.

    model = se_densenet(121, num_classes=10)            # ImageNet stem, 224 px
    model = se_densenet(100, num_classes=10, small_inputs=True)   # DenseNet-BC L=100 k=12, 32 px
    load_weights(model, "densenet121.pth", strict=False)        # transfer: SE stays at init
"""

from __future__ import annotations

import functools
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = [
    "SEDenseNet",
    "se_densenet",
    "se_densenet121",
    "se_densenet161",
    "se_densenet169",
    "se_densenet201",
    "se_densenet264",
    "se_densenet_bc100",
    "data_defaults",
    "load_weights",
    "LoadReport",
    "IMAGENET_DEPTHS",
]

# depth -> (block_config, growth_rate, num_init_features), as in the DenseNet paper / torchvision.
IMAGENET_DEPTHS: dict[int, tuple[tuple[int, ...], int, int]] = {
    121: ((6, 12, 24, 16), 32, 64),
    161: ((6, 12, 36, 24), 48, 96),
    169: ((6, 12, 32, 32), 32, 64),
    201: ((6, 12, 48, 32), 32, 64),
    264: ((6, 12, 64, 48), 32, 64),
}
SMALL_INPUT_GROWTH = 12  # DenseNet-BC L=100 k=12, the CIFAR model of the paper
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_defaults(small_inputs: bool = False) -> dict[str, Any]:
    """Input size (one side, px), centre-crop fraction and normalisation the model was built for,
    so that predict/export never guess (timm's default_cfg)."""
    return {
        "input_size": 32 if small_inputs else 224,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


class SqueezeExcite(nn.Module):
    """Channel attention on a layer's new maps: pool -> fc -> ReLU -> fc -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)  # k=12, r=16 would otherwise give a 0-wide layer
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s), inplace=True)))
        return x * s[:, :, None, None]


def _keep_convolutions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Efficient mode's recompute policy: keep what the convolutions produce, recompute the rest."""
    if op == torch.ops.aten.convolution.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Module-level and a functools.partial: the form torch.compile accepts as a context_fn.
_KEEP_CONVOLUTIONS = functools.partial(create_selective_checkpoint_contexts, _keep_convolutions)


class _DenseLayer(nn.Module):
    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        se_reduction: int | None,
        efficient: bool,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)
        self.se = SqueezeExcite(growth_rate, se_reduction) if se_reduction else None
        self.drop_rate = float(drop_rate)
        self.efficient = efficient
        self._recomputing = False

    def bottleneck(self, *inputs: Tensor) -> Tensor:
        """concat-BN-ReLU-Conv1x1. ReLUs are out of place here: a selectively checkpointed region
        must not mutate its tensors."""
        return self.conv1(F.relu(self._norm(self.norm1, torch.cat(inputs, 1))))

    def convolutions(self, *inputs: Tensor) -> Tensor:
        """The bottleneck, then BN-ReLU-Conv3x3: the layer up to its SE block."""
        return self.second_conv(self.bottleneck(*inputs))

    def second_conv(self, x: Tensor) -> Tensor:
        """BN-ReLU-Conv3x3 on the bottleneck's output."""
        return self.conv2(F.relu(self._norm(self.norm2, x)))

    def _norm(self, bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
        if self._recomputing and bn.training:
            # The backward recomputation must not move the running stats a second time (momentum 0
            # keeps them; num_batches_tracked is only counted by the module): same batch statistics,
            # same output, and the same tensors saved, which checkpoint verifies.
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.0, bn.eps)
        return bn(x)

    def _recompute_contexts(self) -> tuple[Any, Any]:
        return nullcontext(), self._flag_recompute()

    @contextmanager
    def _flag_recompute(self):
        self._recomputing = True
        try:
            yield
        finally:
            self._recomputing = False

    def forward(self, features: list[Tensor]) -> Tensor:
        if not (self.efficient and self.training and torch.is_grad_enabled()):
            out = self.convolutions(*features)
        elif torch.compiler.is_compiling():
            # The partitioner recomputes only the memory-bound concat, BNs and ReLUs (whose
            # c-channel outputs dominate a DenseNet's activations) and keeps both convolution
            # outputs: no convolution runs twice and no module code runs again.
            out = cp.checkpoint(self.convolutions, *features, use_reentrant=False, context_fn=_KEEP_CONVOLUTIONS)
        else:
            # Eager, the same policy costs ~1 ms of Python dispatch per layer, more than it saves;
            # recomputing the bottleneck, 1x1 convolution included, is cheaper there.
            out = self.second_conv(
                cp.checkpoint(self.bottleneck, *features, use_reentrant=False, context_fn=self._recompute_contexts)
            )
        return self._excite(out)

    def forward_normalized(self, normalized: list[Tensor]) -> Tensor:
        """Compiled training with shared_bn: `forward` on inputs already normalised by their
        batch statistics; norm1 only adds its scale and shift (its running stats are updated
        by the block)."""
        if self.efficient and torch.is_grad_enabled():
            out = cp.checkpoint(
                self.convolutions_normalized, *normalized, use_reentrant=False, context_fn=_KEEP_CONVOLUTIONS
            )
        else:
            out = self.convolutions_normalized(*normalized)
        return self._excite(out)

    def convolutions_normalized(self, *normalized: Tensor) -> Tensor:
        x = torch.cat(normalized, 1) * self.norm1.weight[:, None, None] + self.norm1.bias[:, None, None]
        return self.second_conv(self.conv1(F.relu(x)))

    def _excite(self, out: Tensor) -> Tensor:
        if self.se is not None:
            out = self.se(out)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    def __init__(
        self, num_layers: int, num_input_features: int, growth_rate: int, shared_bn: bool = False, **layer_args: Any
    ) -> None:
        super().__init__()
        self.shared_bn = shared_bn
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, **layer_args)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        if self.shared_bn and self.training and torch.compiler.is_compiling():
            return self._forward_shared_bn(x)
        # A list, concatenated once per layer: with efficient=True only these k-channel pieces
        # are kept for backward, not every layer's full concatenation.
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)

    def _forward_shared_bn(self, x: Tensor) -> Tensor:
        """The same function, less memory traffic: a feature map's batch mean and variance are
        the same in every later layer's norm1, so each map is normalised once, when it is made,
        and each norm1 applies only its own scale and shift (no statistics pass over its whole
        concatenated input, and one small BN backward per map instead of one per reader)."""
        features, normalized, means, variances = [x], [], [], []
        for layer in self.values():
            newest = features[-1]
            normalized.append(F.batch_norm(newest, None, None, training=True, eps=layer.norm1.eps))
            with torch.no_grad():
                var, mean = torch.var_mean(newest.float(), dim=(0, 2, 3))  # unbiased, for running stats
            means.append(mean)
            variances.append(var)
            _update_running_stats(layer.norm1, torch.cat(means), torch.cat(variances))
            features.append(layer.forward_normalized(normalized))
        return torch.cat(features, 1)


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> None:
    """What BatchNorm2d's own training forward does to its buffers (momentum 0.1 by default)."""
    bn.num_batches_tracked.add_(1)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), bn.momentum)
    bn.running_var.lerp_(var.to(bn.running_var.dtype), bn.momentum)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def _stem(num_init_features: int, small_inputs: bool) -> list[tuple[str, nn.Module]]:
    if small_inputs:
        # CIFAR DenseNet-BC: one 3x3 conv; the first dense layer's BN-ReLU follows directly.
        return [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, padding=1, bias=False))]
    return [
        ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]


class SEDenseNet(nn.Module):
    """DenseNet-BC with optional SE in every dense layer (see module docstring).

    Args:
        block_config: dense layers per block.
        num_classes: classifier outputs; 0 gives features only (an Identity head).
        growth_rate: k, new maps per dense layer.
        num_init_features: stem output channels.
        bn_size: bottleneck width as a multiple of k.
        compression: fraction of channels a transition keeps, in (0, 1].
        drop_rate: dropout on each dense layer's new maps.
        se_reduction: SE bottleneck reduction r; None switches SE off.
        shared_bn: compiled training normalises each feature map once and shares it with every
            later layer's norm1 (the same function with less memory traffic; eager ignores it).
        efficient: recompute each dense layer's concat-BN-ReLU in backward instead of storing it
            (checkpointing; compiled, the convolution outputs are kept and only the cheap
            concat, BNs and ReLUs run twice). About half the activation memory.
        small_inputs: CIFAR stem (conv3x3 stride 1, no max-pool) instead of the ImageNet one.
    """

    def __init__(
        self,
        block_config: tuple[int, ...],
        num_classes: int = 1000,
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        se_reduction: int | None = 16,
        efficient: bool = False,
        small_inputs: bool = False,
        shared_bn: bool = False,
    ) -> None:
        super().__init__()
        self.arch = {
            "block_config": tuple(block_config),
            "num_classes": num_classes,
            "growth_rate": growth_rate,
            "num_init_features": num_init_features,
            "bn_size": bn_size,
            "compression": compression,
            "se_reduction": se_reduction,
            "small_inputs": small_inputs,
        }
        self.data_config = data_defaults(small_inputs)

        layers = _stem(num_init_features, small_inputs)
        layer_args = dict(bn_size=bn_size, drop_rate=drop_rate, se_reduction=se_reduction, efficient=efficient)
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, channels, growth_rate, shared_bn=shared_bn, **layer_args)
            layers.append((f"denseblock{i + 1}", block))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out = max(1, int(channels * compression))
                layers.append((f"transition{i + 1}", _Transition(channels, out)))
                channels = out
        layers.append(("norm5", nn.BatchNorm2d(channels)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.num_features = channels
        self.classifier = self._new_head(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.zeros_(head.bias)
        return head

    def set_efficient(self, efficient: bool) -> None:
        for m in self.modules():
            if isinstance(m, _DenseLayer):
                m.efficient = efficient

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for transfer learning (0 removes it); the features are kept."""
        p = next(self.features.parameters())
        self.classifier = self._new_head(num_classes).to(device=p.device, dtype=p.dtype)
        self.arch["num_classes"] = num_classes

    def fingerprint(self) -> str:
        """Everything that fixes the parameter shapes, as a short stable string: two models
        with equal fingerprints can exchange state dicts."""
        a = self.arch
        se = f"se{a['se_reduction']}" if a["se_reduction"] else "nose"
        return (
            f"sedensenet-b{'.'.join(map(str, a['block_config']))}-k{a['growth_rate']}"
            f"-i{a['num_init_features']}-bn{a['bn_size']}-c{a['compression']:g}-{se}"
            f"-{'small' if a['small_inputs'] else 'imagenet'}-nc{a['num_classes']}"
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        x = F.relu(x, inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _resolve_blocks(depth: int, small_inputs: bool) -> tuple[tuple[int, ...], int, int]:
    if depth in IMAGENET_DEPTHS:
        return IMAGENET_DEPTHS[depth]
    named = ", ".join(map(str, IMAGENET_DEPTHS))
    _check(
        small_inputs,
        f"depth must be one of {named} (or a DenseNet-BC depth 6n+4 with small_inputs=True), got {depth}",
    )
    _check(
        depth >= 10 and (depth - 4) % 6 == 0,
        f"depth with small_inputs must be one of {named} or 6n+4 >= 10 (e.g. 40, 100, 190), got {depth}",
    )
    n = (depth - 4) // 6
    return (n, n, n), SMALL_INPUT_GROWTH, 2 * SMALL_INPUT_GROWTH


def se_densenet(
    depth: int = 121,
    num_classes: int = 1000,
    *,
    growth_rate: int | None = None,
    num_init_features: int | None = None,
    bn_size: int = 4,
    compression: float = 0.5,
    drop_rate: float = 0.0,
    se: bool = True,
    se_reduction: int = 16,
    efficient: bool = False,
    small_inputs: bool = False,
    block_config: tuple[int, ...] | None = None,
    shared_bn: bool = False,
) -> SEDenseNet:
    """SE-DenseNet of a named depth (121, 161, 169, 201, 264; with small_inputs also any BC depth
    6n+4: three blocks of n layers, k=12, 2k stem maps). Explicit block_config, growth_rate and
    num_init_features override what the depth implies; small_inputs without them follows the
    CIFAR model (k=12), where growth_rate alone also sets the stem to 2k."""
    if block_config is None:
        block_config, default_k, default_init = _resolve_blocks(depth, small_inputs)
    else:
        block_config = tuple(block_config)
        _check(
            len(block_config) > 0 and all(isinstance(n, int) and n > 0 for n in block_config),
            f"block_config must be a non-empty tuple of positive ints, got {block_config}",
        )
        default_k, default_init = IMAGENET_DEPTHS.get(depth, IMAGENET_DEPTHS[121])[1:]
    if growth_rate is not None and num_init_features is None and small_inputs and depth not in IMAGENET_DEPTHS:
        default_init = 2 * growth_rate
    growth_rate = default_k if growth_rate is None else growth_rate
    num_init_features = default_init if num_init_features is None else num_init_features

    _check(isinstance(num_classes, int) and num_classes >= 0, f"num_classes must be an int >= 0, got {num_classes}")
    _check(isinstance(growth_rate, int) and growth_rate > 0, f"growth_rate must be an int > 0, got {growth_rate}")
    _check(
        isinstance(num_init_features, int) and num_init_features > 0,
        f"num_init_features must be an int > 0, got {num_init_features}",
    )
    _check(isinstance(bn_size, int) and bn_size > 0, f"bn_size must be an int > 0, got {bn_size}")
    _check(0.0 < compression <= 1.0, f"compression must be in (0, 1], got {compression}")
    _check(0.0 <= drop_rate < 1.0, f"drop_rate must be in [0, 1), got {drop_rate}")
    _check(isinstance(se_reduction, int) and se_reduction >= 1, f"se_reduction must be an int >= 1, got {se_reduction}")
    return SEDenseNet(
        block_config,
        num_classes=num_classes,
        growth_rate=growth_rate,
        num_init_features=num_init_features,
        bn_size=bn_size,
        compression=compression,
        drop_rate=drop_rate,
        se_reduction=se_reduction if se else None,
        efficient=efficient,
        small_inputs=small_inputs,
        shared_bn=shared_bn,
    )


def se_densenet121(**kwargs: Any) -> SEDenseNet:
    return se_densenet(121, **kwargs)


def se_densenet161(**kwargs: Any) -> SEDenseNet:
    return se_densenet(161, **kwargs)


def se_densenet169(**kwargs: Any) -> SEDenseNet:
    return se_densenet(169, **kwargs)


def se_densenet201(**kwargs: Any) -> SEDenseNet:
    return se_densenet(201, **kwargs)


def se_densenet264(**kwargs: Any) -> SEDenseNet:
    return se_densenet(264, **kwargs)


def se_densenet_bc100(**kwargs: Any) -> SEDenseNet:
    """The CIFAR DenseNet-BC L=100 k=12 (32 px inputs)."""
    return se_densenet(100, small_inputs=True, **kwargs)


# ----------------------------------------------------------------------------- weights

# torchvision's pre-0.4 files name 'denselayer1.norm.1.weight'; '.' is no longer allowed in module
# names (the same pattern as torchvision's densenet._load_state_dict).
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


@dataclass
class LoadReport:
    """What load_weights did not load: model keys left at init, file keys ignored, and
    classifier keys dropped because the head has a different shape (transfer learning)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _read_state_dict(source: Mapping[str, Tensor] | str | Path) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):  # full training checkpoints
        if isinstance(sd.get(wrapper), Mapping):
            sd = dict(sd[wrapper])
    if not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("weights: expected a state dict of tensors (or a dict with a 'model'/'state_dict' key)")
    return sd


def _canonical_key(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    m = _OLD_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def load_weights(model: nn.Module, source: Mapping[str, Tensor] | str | Path, *, strict: bool = True) -> LoadReport:
    """Load a state dict, .pt/.pth or .safetensors file (ours or torchvision's) into `model`.

    A classifier of another shape is dropped with a warning and the model keeps its fresh head.
    Any other shape mismatch means a different architecture: ValueError. With strict=True any
    missing or unexpected key is a ValueError too; strict=False loads what matches (SE-less
    torchvision weights into an SE model leave the SE layers at init)."""
    sd = {_canonical_key(k): v for k, v in _read_state_dict(source).items()}
    own = model.state_dict()
    report = LoadReport()
    dropped_shapes = []
    for key in list(sd):
        if key not in own or sd[key].shape == own[key].shape:
            continue
        shapes = f"file {tuple(sd[key].shape)} vs model {tuple(own[key].shape)}"
        if key.startswith("classifier."):
            report.dropped.append(key)
            dropped_shapes.append(f"{key} {shapes}")
            del sd[key]
            continue
        raise ValueError(f"weights are for a different architecture: {key} has shape {shapes}")
    if report.dropped:
        warnings.warn(
            f"classifier shape differs, kept the model's fresh head: {'; '.join(dropped_shapes)}", stacklevel=2
        )

    # Decide before touching the model, so that a refused file leaves it as it was.
    # num_batches_tracked is a counter absent from files older than torch 0.4: never a reason to refuse.
    report.missing = [
        k for k in own if k not in sd and k not in report.dropped and not k.endswith("num_batches_tracked")
    ]
    report.unexpected = [k for k in sd if k not in own]
    if strict and (report.missing or report.unexpected):
        first = (report.missing or report.unexpected)[0]
        raise ValueError(
            f"weights do not match the model: {len(report.missing)} missing, {len(report.unexpected)} unexpected "
            f"keys (first: {first}); pass strict=False to load the matching ones (e.g. SE-less weights into an SE model)"
        )
    model.load_state_dict(sd, strict=False)
    return report
