"""Data modules: biased-split semantics, patches/masks, augmentation alignment, toy data, bad-data errors."""

from __future__ import annotations

import csv

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from negspace.data_modules import (
    GreenPixelDataModule,
    MotionDataModule,
    SpuriousPatchDataModule,
    SyntheticLesionDataModule,
)
from negspace.data_modules.folder import (
    CSVImageDataset,
    DictTensorDataset,
    ImageDataModule,
    ImageFolderWithMasks,
)
from negspace.data_modules.lesions import lesion_images
from negspace.data_modules.patches import default_dilation, dilate_mask, draw_patch, patch_rng
from negspace.data_modules.toy import green_pixel_images, motion_sequences
from negspace.data_modules.transforms import apply_albumentations

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(n: int = 40, size: int = 32, n_classes: int = 2, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.25
    y = torch.arange(n) % n_classes
    return TensorDataset(x, y)


def _items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def _dm(base, **kw) -> SpuriousPatchDataModule:
    kw.setdefault("augment", False)
    dm = SpuriousPatchDataModule(base, **kw)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("patch", ["colorful", "ellipse", "solid"])
def test_split_semantics_and_images_change_only_inside_patch(patch: str) -> None:
    base = _base(n=30, n_classes=3)
    dm = _dm(base, patch=patch, val_fraction=0.5, spurious_class=1, dilation=2)
    dm0 = _dm(base, patch=patch, val_fraction=0.5, spurious_class=1, dilation=0)
    assert dm.num_classes == 3 and dm.class_names == ("0", "1", "2")
    # training: every spurious-class sample patched, no other sample
    for it in _items(dm.train_set):
        present = bool(it["mask"].any())
        assert present == (it["label"] == 1)
        assert it["group"] == 2 * it["label"] + int(present)
        assert it["mask"].shape == (1, 32, 32)
    splits = dm.val_dataloader()
    assert len(splits) == 3
    sets = dm.val_sets
    idx = [it["index"] for it in _items(sets[0])]
    assert idx == [it["index"] for it in _items(sets[1])] == [it["index"] for it in _items(sets[2])]
    expect = {0: lambda y: y == 1, 1: lambda y: y != 1, 2: lambda y: False}  # train_bias, inverse_bias, no_bias
    for s in range(3):
        for it, it0 in zip(_items(sets[s]), _items(dm0.val_sets[s])):
            x0 = base[it["index"]][0]
            present = expect[s](it["label"])
            assert bool(it["mask"].any()) == present
            assert it["group"] == 2 * it["label"] + int(present)
            torch.testing.assert_close(it["image"], it0["image"])  # dilation changes masks only
            changed = (it["image"] != x0).any(0, keepdim=True)
            assert not (changed & (it0["mask"] == 0)).any(), "image changed outside the undilated patch"
            if present:
                assert changed.sum() > 0
                torch.testing.assert_close(it["mask"], dilate_mask(it0["mask"], 2))
                assert set(it["mask"].unique().tolist()) <= {0.0, 1.0}
            else:
                torch.testing.assert_close(it["image"], x0)
                assert not it["mask"].any()
    # test loaders reuse the validation splits when no test data/fraction is given
    assert dm.test_sets is dm.val_sets and len(dm.test_dataloader()) == 3


def test_determinism_per_seed_and_bias_ratio() -> None:
    base = _base(n=60)
    a, b = _dm(base, bias_ratio=0.5, seed=3), _dm(base, bias_ratio=0.5, seed=3)
    c = _dm(base, bias_ratio=0.5, seed=4)
    ia, ib = _items(a.train_set), _items(b.train_set)
    for x, y in zip(ia, ib):
        torch.testing.assert_close(x["image"], y["image"])
        torch.testing.assert_close(x["mask"], y["mask"])
    n_spur = sum(it["label"] == 0 for it in ia)
    n_patched = sum(bool(it["mask"].any()) for it in ia)
    assert n_patched == round(0.5 * n_spur) and 0 < n_patched < n_spur
    assert all(not it["mask"].any() for it in ia if it["label"] != 0)
    pa = {it["index"] for it in ia if it["mask"].any()}
    pc = {it["index"] for it in _items(c.train_set) if it["mask"].any()}
    assert pa != pc  # another seed: other patched samples
    # same base index → same patch in every split and module with the same seed
    v = a.val_sets[0][0]
    torch.testing.assert_close(v["image"], b.val_sets[0][0]["image"])
    assert _dm(base, bias_ratio=0.0).train_set is not None
    assert not any(it["mask"].any() for it in _items(_dm(base, bias_ratio=0.0).train_set))
    # a test fraction gives separate test splits
    t = _dm(base, test_fraction=0.2)
    assert set(t.test_sets[0].indices).isdisjoint(t.val_sets[0].indices)
    assert set(t.test_sets[0].indices).isdisjoint(t.train_set.indices)


def test_patch_functions() -> None:
    assert default_dilation(224) == 10 and default_dilation(64) == 3 and default_dilation(32) == 1
    m = torch.zeros(1, 15, 15)
    m[0, 7, 7] = 1
    d = dilate_mask(m, 3)
    assert d.sum() == 49 and d[0, 4:11, 4:11].all()
    assert torch.equal(dilate_mask(m, 0), m)
    img = torch.full((3, 40, 40), 0.5)
    for style in ("colorful", "ellipse", "solid"):
        out, mask = draw_patch(img, style, 12, patch_rng(0, 5))
        out2, mask2 = draw_patch(img, style, 12, patch_rng(0, 5))
        assert torch.equal(out, out2) and torch.equal(mask, mask2)
        assert torch.equal(out * (1 - mask), img * (1 - mask))
        assert mask.sum() > 0
    out, mask = draw_patch(img, "colorful", 12, patch_rng(0, 1))
    assert mask.sum() == 144
    assert len(out[:, mask[0] > 0].T.unique(dim=0)) >= 2  # several block colours
    # the ellipse touches the image border
    _, em = draw_patch(img, "ellipse", 12, patch_rng(1, 2))
    assert em[0, 0].any() or em[0, -1].any() or em[0, :, 0].any() or em[0, :, -1].any()
    # dilation default scales with the image: 64 px → 3 px
    dm = _dm(_base(n=20, size=64), dilation=None)
    it = next(i for i in _items(dm.val_sets[0]) if i["mask"].any())
    dm0 = _dm(_base(n=20, size=64), dilation=0)
    it0 = dm0.val_sets[0][[i["index"] for i in _items(dm0.val_sets[0])].index(it["index"])]
    torch.testing.assert_close(it["mask"], dilate_mask(it0["mask"], 3))


def test_augmentation_keeps_mask_aligned() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 16, 20, generator=g)
    mask = torch.zeros(1, 16, 20)
    mask[0, 2:5, 1:4] = 1
    out, om = apply_albumentations(A.Compose([A.HorizontalFlip(p=1.0)]), img, mask)
    torch.testing.assert_close(out, img.flip(-1))
    torch.testing.assert_close(om, mask.flip(-1))
    # colour jitter leaves masks in place and images in [0, 1]
    jit = A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=1.0)])
    out, om = apply_albumentations(jit, img, mask)
    torch.testing.assert_close(om, mask)
    assert 0 <= out.min() and out.max() <= 1 and not torch.equal(out, img)
    # through the data module: flipped training items keep image/mask aligned
    base = _base(n=20)
    plain = _dm(base)
    flip = _dm(base, augment=True, transforms=A.Compose([A.HorizontalFlip(p=1.0)]))
    for a, b in zip(_items(plain.train_set), _items(flip.train_set)):
        torch.testing.assert_close(b["image"], a["image"].flip(-1))
        torch.testing.assert_close(b["mask"], a["mask"].flip(-1))
    # the default (paper) augmentation runs in the loader
    batch = next(iter(_dm(base, augment=True, batch_size=8).train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["mask"].shape == (8, 1, 32, 32)
    # ... seeded by the data module's seed (albumentations does not follow torch's seed)
    def augmented(seed: int) -> torch.Tensor:
        dm = _dm(base, augment=True, seed=seed)
        return torch.stack([dm.train_set[i]["image"] for i in range(len(dm.train_set))])

    torch.testing.assert_close(augmented(0), augmented(0))
    assert not torch.equal(augmented(0), augmented(1))


def test_bad_arguments_and_bad_data() -> None:
    base = _base(n=20)
    with pytest.raises(ValueError, match="bias_ratio"):
        SpuriousPatchDataModule(base, bias_ratio=1.5)
    with pytest.raises(ValueError, match="bias_ratio"):
        SpuriousPatchDataModule(base, bias_ratio=-0.1)
    with pytest.raises(ValueError, match="patch must be one of"):
        SpuriousPatchDataModule(base, patch="stars")
    with pytest.raises(ValueError, match="patch_size"):
        SpuriousPatchDataModule(base, patch_size=1.5)
    # empty split: no spurious-class samples
    only_ones = TensorDataset(torch.rand(10, 3, 8, 8), torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="empty split"):
        _dm(only_ones, spurious_class=0, num_classes=2)
    with pytest.raises(ValueError, match="empty split"):
        SpuriousPatchDataModule(TensorDataset(torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)))
    # labels outside the classes
    bad = TensorDataset(torch.rand(10, 3, 8, 8), torch.tensor([0, 1] * 4 + [5, 0]))
    with pytest.raises(ValueError, match="outside the classes"):
        _dm(bad, num_classes=2)
    with pytest.raises(ValueError, match="spurious_class"):
        _dm(base, spurious_class=2)
    with pytest.raises(ValueError, match="spurious_class"):
        SpuriousPatchDataModule(base, spurious_class="benign")
    # images outside [0, 1] / wrong type / mask of the wrong size
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _dm(TensorDataset(torch.rand(10, 3, 8, 8) * 3, torch.arange(10) % 2)).train_set[0]
    with pytest.raises(ValueError, match="float tensor"):
        _dm(TensorDataset(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10) % 2)).train_set[0]
    wrong = TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10) % 2, torch.zeros(10, 1, 4, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        _dm(wrong).train_set[0]


def _write_png(path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_and_csv_datasets(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        for i in range(4):
            _write_png(tmp_path / "img" / cls / f"{i}.png", rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    m = np.zeros((12, 10), dtype=np.uint8)
    m[2:5, 3:6] = 255
    _write_png(tmp_path / "masks" / "benign" / "1.png", m)
    ds = ImageFolderWithMasks(tmp_path / "img", tmp_path / "masks")
    assert ds.classes == ["benign", "malignant"] and len(ds) == 8 and ds.targets == [0] * 4 + [1] * 4
    it = ds[1]
    assert it["image"].shape == (3, 12, 10) and 0 <= it["image"].min() and it["image"].max() <= 1
    assert it["mask"].sum() == 9 and it["group"] == 1 and not ds[0]["mask"].any() and ds[0]["group"] == 0
    assert ImageFolderWithMasks(tmp_path / "img", size=8)[0]["image"].shape == (3, 8, 8)
    # feeds SpuriousPatchDataModule (synthetic patches on top; real mask united)
    dm = _dm(ds, val_fraction=0.5, patch_size=4)
    assert dm.num_classes == 2 and len(dm.val_dataloader()) == 3
    assert dm.class_names == ("benign", "malignant")
    # direct use with real masks
    plain = ImageDataModule(ds, val={"val": ds}, augment=False, batch_size=4)
    assert next(iter(plain.train_dataloader()))["mask"].shape == (4, 1, 12, 10)
    # CSV
    rows = [("img/benign/0.png", "benign", ""), ("img/malignant/0.png", "malignant", ""),
            ("img/benign/1.png", "benign", "masks/benign/1.png")]
    with (tmp_path / "data.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "dx", "mask"])
        w.writerows(rows)
    cds = CSVImageDataset(tmp_path / "data.csv", "path", "dx", mask_col="mask")
    assert cds.classes == ["benign", "malignant"] and cds.targets == [0, 1, 0] and cds[2]["mask"].sum() == 9


def test_folder_and_csv_bad_data(tmp_path) -> None:
    rng = np.random.default_rng(0)
    _write_png(tmp_path / "img" / "a" / "0.png", rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    _write_png(tmp_path / "img" / "b" / "0.png", rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    # mask of the wrong size
    _write_png(tmp_path / "masks" / "a" / "0.png", np.zeros((6, 6), dtype=np.uint8))
    ds = ImageFolderWithMasks(tmp_path / "img", tmp_path / "masks")
    with pytest.raises(ValueError, match="has size 6x6 but its image is 12x10"):
        ds[0]
    # missing mask when required
    with pytest.raises(ValueError, match="mask file"):
        ImageFolderWithMasks(tmp_path / "img", tmp_path / "masks", require_masks=True)
    # class folder not among class_names
    with pytest.raises(ValueError, match="not in class_names"):
        ImageFolderWithMasks(tmp_path / "img", class_names=["a"])
    # unreadable image
    (tmp_path / "img" / "b" / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image"):  # at construction (sizes are read up front)
        ImageFolderWithMasks(tmp_path / "img")
    ds2 = ImageFolderWithMasks(tmp_path / "img", size=8)  # with size= images are read only when loaded
    with pytest.raises(ValueError, match="cannot read image"):
        ds2[2]
    # CSV: missing image file, label outside the classes
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "y"])
        w.writerow(["img/a/0.png", "a"])
        w.writerow(["img/a/missing.png", "b"])
    with pytest.raises(ValueError, match="do not exist"):
        CSVImageDataset(tmp_path / "d.csv", "path", "y")
    with (tmp_path / "e.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "y"])
        w.writerow(["img/a/0.png", "a"])
        w.writerow(["img/b/0.png", "zebra"])
    with pytest.raises(ValueError, match="outside the classes"):
        CSVImageDataset(tmp_path / "e.csv", "path", "y", class_names=["a", "b"])
    with pytest.raises(ValueError, match="not a column"):
        CSVImageDataset(tmp_path / "e.csv", "file", "y")


def test_green_pixel_data() -> None:
    x, y, m = green_pixel_images(200, seed=1)
    assert x.shape == (200, 3, 32, 32) and y.shape == (200,) and m.shape == (200, 1, 32, 32)
    assert int((y == 0).sum()) == 100
    green = (x[:, 1] == 1) & (x[:, 0] == 0) & (x[:, 2] == 0)
    assert torch.equal(green.flatten(1).sum(1), (y == 0).long())  # class 0 = green pixel present
    assert torch.equal(green.unsqueeze(1).float(), m)
    non_green = (x[:, 0] > 0) | (x[:, 2] > 0)
    counts = non_green.flatten(1).sum(1)
    assert counts.min() >= 8 and counts.max() <= 12
    assert not (non_green & (x[:, 1] > 0)).any()  # non-green pixels have G = 0
    assert set(x[:, [0, 2]].unique().tolist()) <= {0.0, 0.5, 1.0}
    x2, _, _ = green_pixel_images(200, seed=1)
    assert torch.equal(x, x2)
    dm = GreenPixelDataModule(n_train=64, n_val=32, n_test=32, batch_size=16)
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (16, 3, 32, 32) and torch.equal(b["group"], 2 * b["label"] + (b["label"] == 0))


def test_motion_data_matches_detector() -> None:
    from negspace.models import MotionDetector

    x, y, m = motion_sequences(200, seed=2)
    assert x.shape == (200, 2, 1, 32) and int(y.sum()) == 100
    out = MotionDetector()(x)
    assert torch.equal(out.argmax(1), y)
    assert not m[y == 0].any() and m[y == 1].flatten(1).sum(1).min() > 0
    # frame t+1 is frame t with every bar shifted by one pixel: equal mass
    torch.testing.assert_close(x[:, 0].sum((1, 2)), x[:, 1].sum((1, 2)))
    assert torch.equal(motion_sequences(200, seed=2)[0], x)
    dm = MotionDataModule(n_train=20, n_val=10, n_test=10, height=3, batch_size=5)
    b = next(iter(dm.val_dataloader()))
    assert b["image"].shape == (5, 2, 3, 32)
    with pytest.raises(ValueError, match="width"):
        MotionDataModule(width=10)


def test_synthetic_lesions() -> None:
    x, y = lesion_images(40, image_size=32, seed=0)
    assert x.shape == (40, 3, 32, 32) and int(y.sum()) == 20 and 0 <= x.min() and x.max() <= 1
    assert lesion_images(40, image_size=32, seed=0)[0] is x  # cached
    assert not torch.equal(lesion_images(40, image_size=32, seed=1)[0], x)
    dm = SyntheticLesionDataModule(n_train=40, n_val=20, n_test=0, image_size=32, augment=False, batch_size=8)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.class_names == ("benign", "malignant")
    tb, ib, nb = dm.val_dataloader()
    b = next(iter(tb))
    assert torch.equal(b["mask"].flatten(1).amax(1) > 0, b["label"] == 0)
    b = next(iter(ib))
    assert torch.equal(b["mask"].flatten(1).amax(1) > 0, b["label"] == 1)
    assert not next(iter(nb))["mask"].any()
    assert dm.test_sets is dm.val_sets
    dm2 = SyntheticLesionDataModule(n_train=40, n_val=20, n_test=20, image_size=32, seed=5, data_seed=0)
    dm2.setup("fit")
    torch.testing.assert_close(dm2.dataset.images, dm.dataset.images)  # same data, other patch seed
    assert len(dm2.test_dataloader()) == 3


def test_dict_tensor_dataset_and_plain_module_errors() -> None:
    with pytest.raises(ValueError, match="labels"):
        DictTensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="empty split"):
        ImageDataModule(DictTensorDataset(torch.rand(0, 3, 8, 8), torch.zeros(0)))
    with pytest.raises(ValueError, match="batch_size"):
        GreenPixelDataModule(n_train=4, batch_size=0)
