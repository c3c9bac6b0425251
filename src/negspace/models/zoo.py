"""Create a classifier by name: timm, torchvision, or a negspace model.

``create_model("timm:resnet18", 2)``, ``create_model("torchvision:resnet50", 2, pretrained=True)``,
``create_model("xresnet50", 2)``. Names are plain strings so they are YAML-expressible in recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

__all__ = ["NEGSPACE_MODELS", "create_model"]


def _xresnet18(num_classes: int, in_chans: int) -> nn.Module:
    from negspace.models.xmodels import xresnet18

    return xresnet18(num_classes, in_channels=in_chans)


def _xresnet50(num_classes: int, in_chans: int) -> nn.Module:
    from negspace.models.xmodels import xresnet50

    return xresnet50(num_classes, in_channels=in_chans)


def _xsmallcnn(num_classes: int, in_chans: int) -> nn.Module:
    from negspace.models.xmodels import XSmallCNN

    return XSmallCNN(num_classes=num_classes, in_channels=in_chans)


def _green_pixel(num_classes: int, in_chans: int) -> nn.Module:
    from negspace.models.toy import GreenPixelNet

    if num_classes != 2 or in_chans != 3:
        raise ValueError(f"green_pixel has num_classes=2, in_chans=3; got {num_classes}, {in_chans}")
    return GreenPixelNet()


def _motion(num_classes: int, in_chans: int) -> nn.Module:
    from negspace.models.toy import MotionDetector

    if num_classes != 2 or in_chans != 2:
        raise ValueError(f"motion has num_classes=2, in_chans=2 (two frames); got {num_classes}, {in_chans}")
    return MotionDetector()


#: negspace model names accepted by :func:`create_model`.
NEGSPACE_MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "xresnet18": _xresnet18,
    "xresnet50": _xresnet50,
    "xsmallcnn": _xsmallcnn,
    "green_pixel": _green_pixel,
    "motion": _motion,
}


def _replace_torchvision_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last linear layer of a torchvision classifier for a fresh ``num_classes`` one."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
            return
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    old = head[i]
                    head[i] = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
                    return
    raise ValueError(f"cannot find a linear classification head on {type(model).__name__} to resize")


def _torchvision(name: str, num_classes: int, pretrained: bool, in_chans: int) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise ValueError(f"unknown torchvision model {name!r}; e.g. {sorted(available)[:10]} ...")
    if pretrained:
        model = torchvision.models.get_model(name, weights="DEFAULT")
        _replace_torchvision_head(model, num_classes)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_chans != 3:
        conv = getattr(model, "conv1", None)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"in_chans={in_chans} is only supported for torchvision models with a conv1 stem")
        model.conv1 = nn.Conv2d(
            in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
        )
    return model


def create_model(
    name: str, num_classes: int, pretrained: bool = False, in_chans: int = 3, *, checkpoint: str | None = None
) -> nn.Module:
    """Build a classifier returning logits ``(B, num_classes)``.

    Args:
        name: ``"timm:<name>"``, ``"torchvision:<name>"``, or a negspace name (``NEGSPACE_MODELS``:
            ``xresnet18``, ``xresnet50``, ``xsmallcnn``, ``green_pixel``, ``motion``).
        num_classes: number of logits.
        pretrained: load the library's published weights (timm/torchvision; needs network or a cache).
            negspace models have no published weights: pass ``checkpoint`` instead.
        in_chans: input channels.
        checkpoint: optional path to a ``.safetensors`` state dict loaded after construction (any source).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    elif name.startswith("torchvision:"):
        model = _torchvision(name[12:], num_classes, pretrained, in_chans)
    elif name in NEGSPACE_MODELS:
        if pretrained:
            raise ValueError(
                f"negspace model {name!r} has no published weights; use pretrained=False and "
                "checkpoint='<file>.safetensors' to load your own"
            )
        model = NEGSPACE_MODELS[name](num_classes, in_chans)
    else:
        raise ValueError(
            f"unknown model name {name!r}: use 'timm:<name>', 'torchvision:<name>' or one of "
            f"{sorted(NEGSPACE_MODELS)}"
        )
    if checkpoint is not None:
        from safetensors.torch import load_file

        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"checkpoint file not found: {checkpoint!r}")
        model.load_state_dict(load_file(str(path)))
    return model
