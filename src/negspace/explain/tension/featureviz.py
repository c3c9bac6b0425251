"""Feature visualisation by optimisation: maximisation, minimisation (paper 000 §4) and ± attribution
inversion / accentuation with the dot·cos objective (paper 001 §4, eqs. 4–5).

A compact implementation of our own (lucent/lucid are unmaintained, not installed, and cannot minimise or
invert attributions): an image is parameterised in Fourier space with a ``1/f`` spectrum scaling
(decorrelated spectrum, :class:`FourierImage`; ``mode="phase"`` keeps the magnitude fixed and optimises only
the phase, as in MACO), squashed to ``[0, 1]`` with a sigmoid, and each step sees a random jitter / scale /
rotation (:func:`random_transform`, pure torch ops) for robustness to adversarial high-frequency patterns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from negspace.attribution.engine import forward_objective
from negspace.hooks import capture, eval_mode, get_layer, run_until
from negspace.objectives import Objective, as_target

__all__ = [
    "FourierImage",
    "attribution_inversion",
    "dot_cos",
    "random_transform",
    "visualize",
]


def _freqs(h: int, w: int) -> Tensor:
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return (fy**2 + fx**2).sqrt()


class FourierImage(nn.Module):
    """Images ``(B, C, H, W)`` in ``[0, 1]`` parameterised by their 2-D spectrum scaled by ``1/f^decay``.

    ``mode="fft"``: real and imaginary parts are free (lucid-style decorrelated spectrum);
    ``mode="phase"``: the magnitude is fixed to ``1/f^decay`` (times ``magnitude``) and only the phase is
    optimised (MACO's magnitude-constrained parameterisation). ``init``: an image ``(B, C, H, W)`` in ``(0, 1)``
    to start from (accentuation; ``fft`` mode reproduces it exactly).
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 64,
        channels: int = 3,
        batch: int = 1,
        *,
        mode: str = "fft",
        decay: float = 1.0,
        sd: float = 0.01,
        magnitude: float = 0.1,
        init: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("fft", "phase"):
            raise ValueError(f"mode must be 'fft' or 'phase', got {mode!r}")
        h, w = (size, size) if isinstance(size, int) else size
        if init is not None:
            if init.dim() != 4:
                raise ValueError(f"init must be (B, C, H, W), got {tuple(init.shape)}")
            batch, channels, h, w = init.shape
        if min(h, w) < 2 or channels < 1 or batch < 1:
            raise ValueError(f"need size >= 2, channels >= 1, batch >= 1; got {(h, w)}, {channels}, {batch}")
        self.mode, self.h, self.w = mode, h, w
        f = _freqs(h, w)
        scale = 1.0 / f.clamp_min(1.0 / max(h, w)) ** decay
        self.register_buffer("scale", scale / scale.max() * math.sqrt(h * w))
        shape = (batch, channels, h, w // 2 + 1)
        if mode == "fft":
            if init is None:
                spec = torch.randn(*shape, 2, generator=generator) * sd
            else:
                z = torch.logit(init.detach().float().clamp(1e-3, 1 - 1e-3))
                spec = torch.view_as_real(torch.fft.rfft2(z, norm="ortho") / self.scale)
            self.spectrum = nn.Parameter(spec)
        else:
            if init is None:
                phase = (torch.rand(*shape, generator=generator) * 2 - 1) * math.pi
            else:
                z = torch.logit(init.detach().float().clamp(1e-3, 1 - 1e-3))
                phase = torch.fft.rfft2(z, norm="ortho").angle()
            self.phase = nn.Parameter(phase)
            self.magnitude = magnitude

    def forward(self) -> Tensor:
        if self.mode == "fft":
            spec = torch.view_as_complex(self.spectrum) * self.scale
        else:
            spec = torch.polar(self.scale * self.magnitude, self.phase)
        z = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho")
        return torch.sigmoid(z)


def random_transform(
    x: Tensor,
    *,
    jitter: int = 4,
    scale: tuple[float, float] = (0.9, 1.1),
    degrees: float = 10.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random jitter (reflect-padded roll by up to ``jitter`` px), scale and rotation of ``x: (B, C, H, W)``,
    shared by the batch, as one ``affine_grid``/``grid_sample`` (differentiable torch ops)."""
    b, _, h, w = x.shape
    r = torch.rand(4, generator=generator)
    s = scale[0] + (scale[1] - scale[0]) * float(r[0])
    a = math.radians(degrees * (2 * float(r[1]) - 1))
    tx, ty = (2 * float(r[2]) - 1) * jitter * 2 / w, (2 * float(r[3]) - 1) * jitter * 2 / h
    theta = torch.tensor([[math.cos(a) / s, -math.sin(a) / s, tx], [math.sin(a) / s, math.cos(a) / s, ty]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(b, 2, 3).to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _optimise(
    param: FourierImage,
    loss_fn: Callable[[Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    transforms: bool,
    generator: torch.Generator,
    progress: bool,
    desc: str,
) -> Tensor:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not progress):
            img = param()
            if transforms:
                img = random_transform(img, generator=generator)
            loss = loss_fn(img)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return param().detach()


@contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and parameters that do not require grad, both restored on exit (also after an exception)."""
    state = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in state:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield model
    finally:
        for p, rg in state:
            p.requires_grad_(rg)


def visualize(
    model: nn.Module,
    objective: Objective | Callable[[Tensor], Tensor] | int,
    *,
    size: int | tuple[int, int] = 64,
    channels: int = 3,
    batch: int = 1,
    minimize: bool = False,
    steps: int = 128,
    lr: float = 0.05,
    mode: str = "fft",
    transforms: bool = True,
    init: Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Images ``(batch, channels, H, W)`` in ``[0, 1]`` that maximise (or, ``minimize=True``, minimise) ``objective``.

    ``objective``: e.g. ``objectives.neuron("conv2", 1)`` on a *pre-activation* layer (paper 000 §4: minimising
    ``z_j`` reveals the concepts whose absence the neuron encodes), a class index, or any callable ``(B,)``.
    The model is put in eval mode and its parameters are not updated; both are restored afterwards.
    """
    obj = as_target(objective)
    if getattr(obj, "layer", None) is not None:
        get_layer(model, obj.layer)
    g = torch.Generator().manual_seed(seed)
    param = FourierImage(size, channels, batch, mode=mode, init=init, generator=g)
    sign = 1.0 if minimize else -1.0

    def loss_fn(img: Tensor) -> Tensor:
        return sign * forward_objective(model, img, obj).sum()

    with _frozen(model):
        return _optimise(param, loss_fn, steps=steps, lr=lr, transforms=transforms, generator=g,
                         progress=progress, desc="minimise" if minimize else "maximise")  # fmt: skip


def dot_cos(h: Tensor, s: Tensor, p: float = 1.0, eps: float = 1e-8, min_cos: float = 1e-4) -> Tensor:
    """Dot·cos objective (paper 001 eq. 5): ``(h·s)·cos(h, s)^p`` per sample, over all non-batch dims.

    ``h: (B, ...)``; ``s`` broadcastable to one sample. For ``cos > 0`` this is eq. 5,
    ``(h·s)^{p+1} / (‖h‖‖s‖)^p``; the cosine is clamped at ``min_cos`` (as Carter et al.'s atlas code does) so
    the sign of the dot product survives even ``p`` — eq. 5 taken literally would reward anti-aligned ``h``.
    """
    hf = h.flatten(1)
    sf = s.reshape(1, -1).to(hf).expand_as(hf)
    dot = (hf * sf).sum(1)
    cos = dot / (hf.norm(dim=1) * sf.norm(dim=1) + eps)
    return dot * cos.clamp_min(min_cos) ** p


def attribution_inversion(
    model: nn.Module,
    layer: str,
    attribution: Tensor,
    *,
    sign: str = "+",
    init: Tensor | None = None,
    size: int | tuple[int, int] | None = None,
    channels: int = 3,
    steps: int = 128,
    lr: float = 0.05,
    p: float = 1.0,
    mode: str = "fft",
    transforms: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """± attribution inversion (``init=None``, from noise) or accentuation (``init`` = the natural image)
    (paper 001 §4, eqs. 4–5): maximise ``dot_cos(f_l(x), target)`` with target ``ReLU(S)`` (``sign="+"``),
    ``ReLU(−S)`` (``"-"``) or ``|S|`` (``"abs"``, the atlas icons).

    ``attribution``: ``S_l`` of one image, ``(C, H', W')`` matching the layer's output for an input of ``size``
    (spatial dot product), or ``(C,)`` compared with the spatially averaged activation. Returns ``(1, channels, H, W)``.
    """
    get_layer(model, layer)
    if sign not in ("+", "-", "abs"):
        raise ValueError(f"sign must be '+', '-' or 'abs', got {sign!r}")
    s = attribution.detach().float()
    if s.dim() == 4 and s.shape[0] == 1:
        s = s[0]
    target = s.clamp(min=0) if sign == "+" else (-s).clamp(min=0) if sign == "-" else s.abs()
    if float(target.abs().sum()) == 0:
        raise ValueError(f"the {sign!r} part of the attribution is all zero; nothing to invert")
    if init is not None and init.dim() == 3:
        init = init[None]
    if size is None:
        size = tuple(init.shape[-2:]) if init is not None else 64
    g = torch.Generator().manual_seed(seed)
    param = FourierImage(size, channels, 1, mode=mode, init=init, generator=g)

    def loss_fn(img: Tensor) -> Tensor:
        with capture(model, layer, stop_after=True) as cap:
            run_until(model, img)
        h = cap.activations[layer]
        if target.dim() == 1:
            h = h.flatten(2).mean(2) if h.dim() == 4 else h
        elif h.dim() == 4 and target.dim() == 3 and h.shape[2:] != target.shape[1:]:
            h = F.interpolate(h, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return -dot_cos(h, target, p).sum()

    with _frozen(model):
        return _optimise(param, loss_fn, steps=steps, lr=lr, transforms=transforms, generator=g,
                         progress=progress, desc=f"inversion {sign}")  # fmt: skip
