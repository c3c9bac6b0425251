"""Feature visualisation by optimisation: maximisation, minimisation (paper 000 §4) and ± attribution
inversion / accentuation with the dot·cos objective (paper 001 §4, eqs. 4–5).

A compact implementation of our own (lucent/lucid are unmaintained and not installed; lucent can minimise
through ``-objective`` but has no dot·cos attribution inversion): an image is parameterised in Fourier space with a ``1/f`` spectrum scaling
(decorrelated spectrum, :class:`FourierImage`; ``mode="phase"`` keeps the magnitude fixed and optimises only
the phase, as in MACO), squashed to ``[0, 1]`` with a sigmoid, and each step sees a random jitter / scale /
rotation (:func:`random_transform`, pure torch ops) for robustness to adversarial high-frequency patterns;
``transforms="maco"`` uses paper 001's random crops (0.9–0.99 of the image) with uniform and Gaussian noise
(:func:`crop_and_noise`) and ``opacity=True`` returns MACO's opacity mask.
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
    "TRANSFORMS",
    "FourierImage",
    "attribution_inversion",
    "crop_and_noise",
    "dot_cos",
    "random_transform",
    "visualize",
]

#: values of ``transforms=``: ``"maco"`` (paper 001: random crops covering 0.9–0.99 of the image, uniform and
#: Gaussian noise), ``"affine"`` / ``True`` (jitter, scale, rotation; negspace ≤ 0.2), ``False``/``None`` (none)
TRANSFORMS = ("maco", "affine", True, False, None)


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


def crop_and_noise(
    x: Tensor,
    *,
    coverage: tuple[float, float] = (0.9, 0.99),
    uniform: float = 0.05,
    gaussian: float = 0.05,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Paper 001's transformations (§4): a random crop covering a fraction ``coverage`` of the image's side,
    resized back to ``(H, W)``, plus uniform noise in ``±uniform`` and Gaussian noise of std ``gaussian``
    (the noise levels are ours: the paper names the transformations, not their strength)."""
    h, w = x.shape[-2:]
    r = torch.rand(3, generator=generator)
    frac = coverage[0] + (coverage[1] - coverage[0]) * float(r[0])
    ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = int(float(r[1]) * (h - ch + 1)), int(float(r[2]) * (w - cw + 1))
    out = F.interpolate(x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False)
    noise = (torch.rand(x.shape, generator=generator) * 2 - 1) * uniform + torch.randn(x.shape, generator=generator) * gaussian
    return out + noise.to(out)


def _check_transforms(transforms: object) -> str | None:
    if transforms not in TRANSFORMS or (isinstance(transforms, int) and not isinstance(transforms, bool)):
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
    return "affine" if transforms is True else None if transforms in (False, None) else str(transforms)


def _optimise(
    param: FourierImage,
    loss_fn: Callable[[Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    transforms: object,
    generator: torch.Generator,
    progress: bool,
    desc: str,
    opacity: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    kind = _check_transforms(transforms)
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    alpha = None
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not progress):
            img = param()
            if opacity:
                img.retain_grad()
            seen = img
            if kind == "affine":
                seen = random_transform(img, generator=generator)
            elif kind == "maco":
                seen = crop_and_noise(img, generator=generator)
            loss = loss_fn(seen)
            opt.zero_grad()
            loss.backward()
            if opacity and img.grad is not None:  # MACO opacity: pixel-gradient magnitude integrated over steps
                g = img.grad.detach().abs().sum(1, keepdim=True)
                alpha = g if alpha is None else alpha + g
            opt.step()
    out = param().detach()
    if not opacity:
        return out
    if alpha is None:
        alpha = torch.zeros_like(out[:, :1])
    peak = alpha.flatten(1).amax(1).clamp_min(1e-30).view(-1, 1, 1, 1)
    return out, alpha / peak


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
    transforms: bool | str | None = True,
    opacity: bool = False,
    init: Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Images ``(batch, channels, H, W)`` in ``[0, 1]`` that maximise (or, ``minimize=True``, minimise) ``objective``.

    ``objective``: e.g. ``objectives.neuron("conv2", 1)`` on a *pre-activation* layer (paper 000 §4: minimising
    ``z_j`` reveals the concepts whose absence the neuron encodes), a class index, or any callable ``(B,)``.
    ``mode="phase"`` with ``transforms="maco"`` and ``opacity=True`` is paper 001's MACO set-up; ``opacity``
    also returns the opacity mask ``(batch, 1, H, W)`` in ``[0, 1]`` (pixel-gradient magnitudes summed over the
    steps). The model is put in eval mode and its parameters are not updated; both are restored afterwards.
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
        return _optimise(param, loss_fn, steps=steps, lr=lr, transforms=transforms, generator=g, opacity=opacity,
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
    mode: str = "phase",
    transforms: bool | str | None = "maco",
    opacity: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """± attribution inversion (``init=None``, from noise) or accentuation (``init`` = the natural image)
    (paper 001 §4, eqs. 4–5): maximise ``dot_cos(f_l(x), target)`` with target ``ReLU(S)`` (``sign="+"``),
    ``ReLU(−S)`` (``"-"``) or ``|S|`` (``"abs"``, the atlas icons).

    ``attribution``: ``S_l`` of one image, ``(C, H', W')`` matching the layer's output for an input of ``size``
    (spatial dot product), or ``(C,)`` compared with the spatially averaged activation. Returns ``(1, channels, H, W)``
    (and the opacity mask ``(1, 1, H, W)`` with ``opacity=True``). Defaults are the paper's MACO set-up: phase
    parameterisation, random crops with uniform and Gaussian noise; ``mode="fft", transforms="affine"`` is
    negspace ≤ 0.2's.
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
        return _optimise(param, loss_fn, steps=steps, lr=lr, transforms=transforms, generator=g, opacity=opacity,
                         progress=progress, desc=f"inversion {sign}")  # fmt: skip
