"""The two toy networks of paper 000 (§5.1/B.1 and §5.2/B.2); both bias-free.

``GreenPixelNet``: trainable 1×1-conv net (3 → 2 → 2 channels, ReLU, global average pooling).

``MotionDetector``: Hassenstein–Reichardt-style detector with hand-set weights. Input ``(B, 2, H, W)``:
channel 0 is frame ``t``, channel 1 is frame ``t+1``. Layer 1 (``conv1``, kernel ``(C=2)×(H=1)×(W=2)``,
then ReLU) holds two mirror-symmetric spatio-temporal comparisons of neighbouring pixels ``j, j+1``::

    L_j = ReLU(x_t[j+1] − x_{t+1}[j])      # weights: frame t [0, +1], frame t+1 [−1, 0]
    R_j = ReLU(x_t[j]   − x_{t+1}[j+1])    # weights: frame t [+1, 0], frame t+1 [0, −1]  (mirror image)

``L_j`` compares the right pixel at ``t`` with the left pixel at ``t+1``: it is exactly cancelled when the
pattern moved one pixel to the *left* (what was at ``j+1`` is now at ``j``) and is excited otherwise, in
particular by left-to-right motion (a moving bar of width ≥ 2 gives ``ΣL = 2``, a moving dot ``ΣL = 1``;
right-to-left motion gives ``ΣL = 0``). ``R`` is the mirror image. A bias-free one-layer ReLU unit cannot be
direction selective *and* silent for static patterns (``ReLU(z) − ReLU(−z) = z`` telescopes to zero over
space), so static objects excite both subunits equally; the datasets contain moving objects only.

Layer 2 (``conv2``, ``(C=2)×1×1``, no ReLU): output 0 = ``1·L − 1·R`` (the Hassenstein–Reichardt detector,
presence of L→R motion *and absence* of R→L motion), output 1 = ``0.5·L + 0.5·R`` (bi-directional motion
energy); then global average pooling (``gap``). For ``n`` bars moving L→R: outputs ``(2n, n)/|W−1|``; for
``n`` moving L→R plus ``n`` moving R→L: ``(0, 2n)/|W−1|`` — so output 0 wins for L→R sequences (class 0)
and output 1 for bi-directional ones (class 1), Fig. 3 (c).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GreenPixelNet", "MotionDetector", "PointwiseConv2d"]


class PointwiseConv2d(nn.Conv2d):
    """A 1×1, stride-1, unpadded ``nn.Conv2d`` evaluated as an einsum.

    Same parameters, hooks and results as ``nn.Conv2d``; written out because PyTorch's oneDNN CPU path is
    ~7× slower for these tiny channel counts (measured: 0.14 s vs 0.02 s per fwd+bwd of a 256×3×32×32 batch).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bchw,oc->bohw", x, self.weight[:, :, 0, 0])


class GreenPixelNet(nn.Module):
    """Paper 000 §5.2 / Fig. 4 (b): ``conv1`` 1×1 (3→2) → ``relu`` → ``conv2`` 1×1 (2→2) → ``gap``; no biases.

    The output layer has no ReLU (the paper's output node 2 is negative when a green pixel is present).
    Set ``final_relu=True`` to add one. Trained with BCE on one-hot targets, Adam, wd 1e-4 (B.2).

    ``init="symmetric"`` (default) breaks the symmetry that makes the paper's training unreliable (B.2: "does
    not always converge"): ``conv1 ~ U(0.1, 0.6)`` (no channel starts dead on the non-negative inputs) and
    ``conv2 = 0.5·[[1, −1], [−1, 1]] + N(0, 0.05²)`` (channel 0 starts as evidence for class 0, channel 1 for
    class 1). With PyTorch's default init (``init="torch"``) both hidden channels usually become green
    detectors, the red/blue channel dies at the ReLU, and no-green images get logits (0, 0). Measured here
    (16×16 images, Adam lr 0.05, batch 128, 300 steps): symmetric 5/5 seeds reach 100 % test accuracy with
    the paper's solution (a green channel and a red/blue channel; output 1 = +red/blue − green, the encoded
    absence), torch init 1/5. At 32×32 (lr 0.01, batch 256, 600 steps) use decoupled weight decay
    (``AdamW``) or none: 4/4 seeds; Adam's *coupled* L2 decay of 1e-4 outweighs the tiny (GAP / 1024)
    red/blue gradients and kills that channel (3/3 seeds).

    Shapes: ``x: (B, 3, H, W)`` → logits ``(B, 2)``; class 0 = green pixel present, class 1 = absent.
    """

    def __init__(self, final_relu: bool = False, init: str = "symmetric") -> None:
        super().__init__()
        if init not in ("symmetric", "torch"):
            raise ValueError(f"init must be 'symmetric' or 'torch', got {init!r}")
        self.conv1 = PointwiseConv2d(3, 2)
        self.relu = nn.ReLU()
        self.conv2 = PointwiseConv2d(2, 2)
        self.final = nn.ReLU() if final_relu else nn.Identity()
        self.gap = nn.AdaptiveAvgPool2d(1)
        if init == "symmetric":
            with torch.no_grad():
                self.conv1.weight.uniform_(0.1, 0.6)
                w2 = torch.tensor([[0.5, -0.5], [-0.5, 0.5]]) + 0.05 * torch.randn(2, 2)
                self.conv2.weight.copy_(w2.view(2, 2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.gap(self.final(self.conv2(self.relu(self.conv1(x))))).flatten(1)


class MotionDetector(nn.Module):
    """Hand-set Hassenstein–Reichardt CNN of paper 000 §5.1 / B.1 / Fig. 3 (b) (weights in the module doc).

    Names: ``conv1`` (2→2, kernel 1×2: subunits ``L``=channel 0, ``R``=channel 1) → ``relu`` → ``conv2``
    (2→2, 1×1: ``[1, −1]`` and ``[0.5, 0.5]``) → ``gap``. Parameters are frozen (``requires_grad=False``).

    Shapes: ``x: (B, 2, H, W)`` (frames ``t``, ``t+1``; ``W ≥ 2``) → ``(B, 2)``; class 0 = left-to-right motion,
    class 1 = bi-directional motion.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, (1, 2), bias=False)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        w1 = torch.zeros(2, 2, 1, 2)
        w1[0, 0, 0] = torch.tensor([0.0, 1.0])  # L: +x_t[j+1]
        w1[0, 1, 0] = torch.tensor([-1.0, 0.0])  # L: −x_{t+1}[j]
        w1[1, 0, 0] = torch.tensor([1.0, 0.0])  # R: +x_t[j]
        w1[1, 1, 0] = torch.tensor([0.0, -1.0])  # R: −x_{t+1}[j+1]
        w2 = torch.tensor([[1.0, -1.0], [0.5, 0.5]]).view(2, 2, 1, 1)
        with torch.no_grad():
            self.conv1.weight.copy_(w1)
            self.conv2.weight.copy_(w2)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 2 or x.shape[-1] < 2:
            raise ValueError(f"x must be (B, 2, H, W) with W >= 2 (frames t, t+1), got {tuple(x.shape)}")
        return self.gap(self.conv2(self.relu(self.conv1(x)))).flatten(1)
