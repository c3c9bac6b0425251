"""Toy data of paper 000: green-pixel images (§5.2, B.2) and two-frame motion sequences (§5.1, B.1).

Both are generated in memory (vectorised torch, deterministic per seed) and served as item dicts
``{"image", "label", "mask", "group" = 2·label + (mask non-empty), "index"}``.
"""

from __future__ import annotations

import abc

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from negspace.data_modules.folder import DictTensorDataset, _check_loader_args, _loader
from negspace.data_modules.normalize import NormalizeMixin, NormalizeSpec

__all__ = ["GreenPixelDataModule", "MotionDataModule", "green_pixel_images", "motion_sequences"]

_SALT = {"train": 0, "val": 1, "test": 2}


def _check_n(name: str, n: int, minimum: int = 0) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {n!r}")


def green_pixel_images(n: int, size: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Paper 000 B.2 images.

    Each ``size×size`` image is black with 8–12 non-green pixels whose red and blue values are each drawn from
    {0, 0.5, 1} (not both 0; green = 0); exactly half of the images (``n // 2``, random ones) contain one
    additional pure green pixel (0, 1, 0). Pixel positions are distinct.

    Returns:
        ``images (n, 3, size, size)``, ``labels (n,)`` with **class 0 = green pixel present, class 1 = absent**,
        ``masks (n, 1, size, size)`` marking the green pixel (all zero for class 1).
    """
    _check_n("n", n, 1)
    _check_n("size", size, 4)
    g = torch.Generator().manual_seed(int(seed))
    hw = size * size
    n_max = 12
    pos = torch.rand(n, hw, generator=g).topk(n_max + 1, dim=1).indices  # distinct positions
    n_non = torch.randint(8, 13, (n,), generator=g)
    combos = torch.tensor([(r, b) for r in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0) if (r, b) != (0.0, 0.0)])
    col = combos[torch.randint(0, len(combos), (n, n_max), generator=g)]  # (n, 12, 2)
    has_green = torch.zeros(n, dtype=torch.bool)
    has_green[torch.randperm(n, generator=g)[: n // 2]] = True
    flat = torch.zeros(n, 3, hw)
    rows = torch.arange(n).unsqueeze(1).expand(n, n_max)
    used = torch.arange(n_max).unsqueeze(0) < n_non.unsqueeze(1)  # (n, 12)
    p = pos[:, :n_max]
    flat[rows[used], 0, p[used]] = col[..., 0][used]
    flat[rows[used], 2, p[used]] = col[..., 1][used]
    gi = torch.nonzero(has_green).squeeze(1)
    gp = pos[gi, n_max]
    flat[gi, 1, gp] = 1.0
    masks = torch.zeros(n, 1, hw)
    masks[gi, 0, gp] = 1.0
    labels = (~has_green).long()
    return flat.view(n, 3, size, size), labels, masks.view(n, 1, size, size)


def motion_sequences(
    n: int, width: int = 32, height: int = 1, seed: int = 0, max_objects: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Two-frame sequences of moving bars (§5.1): channel 0 = frame ``t``, channel 1 = frame ``t+1``.

    Bars (width 1–3 px, intensity 1 on black, full height) move by one pixel. **Class 0** (left-to-right):
    ``k ∈ {1..max_objects}`` bars all move right. **Class 1** (bi-directional): ``k`` bars move right and ``k``
    move left. Bars live in separate 6-px slots with an empty pixel between slots, so the
    :class:`~negspace.models.MotionDetector` responses of different bars add up.

    Returns:
        ``x (n, 2, height, width)``, ``labels (n,)`` (exactly half each class), ``masks (n, 1, height, width)``
        marking the right-to-left bars in either frame (the concept whose absence output 0 encodes).
    """
    _check_n("n", n, 1)
    _check_n("height", height, 1)
    _check_n("max_objects", max_objects, 1)
    n_slots = (width - 2) // 6
    if n_slots < 2 * max_objects:
        raise ValueError(f"width must be >= {12 * max_objects + 2} for max_objects={max_objects}, got {width}")
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.zeros(n, dtype=torch.long)
    labels[torch.randperm(n, generator=g)[: n // 2]] = 1
    k = torch.randint(1, max_objects + 1, (n,), generator=g)
    n_obj = torch.where(labels == 1, 2 * k, k)
    slots = torch.rand(n, n_slots, generator=g).argsort(1)  # random slot order per sample
    bar_w = torch.randint(1, 4, (n, n_slots), generator=g)
    u = torch.rand(n, n_slots, generator=g)
    x = torch.zeros(n, 2, width)
    masks = torch.zeros(n, width)
    cols = torch.arange(width)
    for j in range(2 * max_objects):
        active = j < n_obj
        # class 1: objects alternate right/left (k of each); class 0: all right
        dx = torch.where((labels == 1) & (j % 2 == 1), -1, 1)
        slot_start = 1 + 6 * slots[:, j]
        w = bar_w[:, j]
        lo, hi = slot_start + 1, slot_start + 5 - w  # start in [lo, hi]: 1 px margin for the shift
        start = lo + (u[:, j] * (hi - lo + 1)).long().clamp(max=(hi - lo))
        f0 = (cols >= start[:, None]) & (cols < (start + w)[:, None]) & active[:, None]
        f1 = (cols >= (start + dx)[:, None]) & (cols < (start + dx + w)[:, None]) & active[:, None]
        x[:, 0] += f0.float()
        x[:, 1] += f1.float()
        masks += ((f0 | f1) & (dx == -1)[:, None]).float()
    x = x.unsqueeze(2).expand(n, 2, height, width).contiguous()
    masks = masks.clamp(max=1.0).view(n, 1, 1, width).expand(n, 1, height, width).contiguous()
    return x, labels, masks


class _TensorSplitsDataModule(NormalizeMixin, L.LightningDataModule, abc.ABC):
    """Train/val/test :class:`DictTensorDataset` splits of ``n_train``/``n_val``/``n_test`` samples;
    ``val``/``test`` loaders are single loaders. Subclasses implement :meth:`_make`. ``normalize``: see
    :class:`~negspace.data_modules.SpuriousPatchDataModule` (applied last, by the loaders)."""

    def __init__(
        self, batch_size: int, num_workers: int, n_train: int, n_val: int, n_test: int, normalize: NormalizeSpec = None
    ) -> None:
        super().__init__()
        self.normalize = normalize
        _check_loader_args(batch_size, num_workers)
        for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            _check_n(name, v, 1)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.n = {"train": n_train, "val": n_val, "test": n_test}
        self.datasets: dict[str, DictTensorDataset] = {}

    @abc.abstractmethod
    def _make(self, split: str) -> DictTensorDataset:
        """Generate the dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""

    def _get(self, split: str) -> DictTensorDataset:
        if split not in self.datasets:
            self.datasets[split] = self._make(split)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val") if stage in (None, "fit") else ("test",) if stage == "test" else ("val",):
            self._get(split)

    def train_dataloader(self) -> DataLoader:
        return _loader(self._normalized(self._get("train")), self.batch_size, self.num_workers, True)

    def val_dataloader(self) -> DataLoader:
        return _loader(self._normalized(self._get("val")), self.batch_size, self.num_workers, False)

    def test_dataloader(self) -> DataLoader:
        return _loader(self._normalized(self._get("test")), self.batch_size, self.num_workers, False)


class GreenPixelDataModule(_TensorSplitsDataModule):
    """Paper 000 §5.2 / B.2 green-pixel data: 32×32 images, class 0 = green pixel present, 1 = absent.

    ``mask`` marks the green pixel. Defaults follow B.2: 20 000 training and 1000 test images (plus an
    independent validation set of ``n_val`` images), batch size 256. Splits use seeds ``(seed, split)``.
    """

    class_names = ("green", "no_green")

    def __init__(
        self,
        n_train: int = 20000,
        n_val: int = 1000,
        n_test: int = 1000,
        image_size: int = 32,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        normalize: NormalizeSpec = None,
    ) -> None:
        super().__init__(batch_size, num_workers, n_train, n_val, n_test, normalize)
        _check_n("image_size", image_size, 4)
        self.image_size, self.seed = image_size, seed

    def _make(self, split: str) -> DictTensorDataset:
        seed = int(self.seed) * 3 + _SALT[split]
        return DictTensorDataset(*green_pixel_images(self.n[split], self.image_size, seed))


class MotionDataModule(_TensorSplitsDataModule):
    """Paper 000 §5.1 motion data: inputs ``(2, height, width)`` = frames ``t``, ``t+1``.

    Class 0 = left-to-right motion, class 1 = bi-directional motion; ``mask`` marks the right-to-left bars.
    See :func:`motion_sequences`. The matching model is :class:`~negspace.models.MotionDetector`.
    """

    class_names = ("left_to_right", "bidirectional")

    def __init__(
        self,
        n_train: int = 1000,
        n_val: int = 200,
        n_test: int = 200,
        width: int = 32,
        height: int = 1,
        max_objects: int = 2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        normalize: NormalizeSpec = None,
    ) -> None:
        super().__init__(batch_size, num_workers, n_train, n_val, n_test, normalize)
        self.width, self.height, self.max_objects, self.seed = width, height, max_objects, seed
        motion_sequences(2, width, height, 0, max_objects)  # validates width/height now

    def _make(self, split: str) -> DictTensorDataset:
        seed = int(self.seed) * 3 + _SALT[split]
        return DictTensorDataset(*motion_sequences(self.n[split], self.width, self.height, seed, self.max_objects))
