"""Artifact discovery (issue 16): a planted square is found by every method, verification by pasting, the
``ArtifactInsertion`` callback and ``negspace discover``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from helpers import hook_count
from negspace.masks.discover import METHODS, Candidate, discover_artifacts, save_candidates, select_images
from negspace.masks.discovery.common import Inputs, concentration, split_examples
from negspace.masks.discovery.spray import eigengap_clusters
from negspace.masks.verify import artifact_patch, insertion_effect, load_patch, paste, save_patch
from negspace.models.xmodels import XSmallCNN

SIZE, SQ, K = 16, 4, 6


def planted(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey noise with a dark 5×5 blob anywhere in every image; class 0 also carries a bright 4×4 square touching a
    random edge (the artifact, its masks returned). Returns ``(images, labels, masks)``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.35 + 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    y = torch.arange(n) % 2
    m = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        t, q = torch.randint(2, SIZE - 7, (2,), generator=g).tolist()
        x[i, :, t : t + 5, q : q + 5] = 0.1
        if y[i] == 0:
            edge, along = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, SIZE - SQ + 1, (1,), generator=g))
            t, q = [(0, along), (SIZE - SQ, along), (along, 0), (along, SIZE - SQ)][edge]
            x[i, :, t : t + SQ, q : q + SQ] = 1.0
            m[i, :, t : t + SQ, q : q + SQ] = 1.0
    return x, y, m


@pytest.fixture(scope="module")
def biased():
    """An XSmallCNN trained for a few seconds on the planted data (it learns the square)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, m = planted()
    net = XSmallCNN(num_classes=2, in_channels=3, width=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(120):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() > 0.95
    yield net, x, y, m
    torch.set_num_threads(n_threads)


def _iou(preview: torch.Tensor, masks: torch.Tensor) -> float:
    p, t = preview > 0.5, masks > 0.5
    return float(((p & t).flatten(1).sum(1) / (p | t).flatten(1).sum(1).clamp_min(1)).mean())


@pytest.fixture(scope="module")
def found(biased):
    net, x, y, _ = biased
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)]
    return data, discover_artifacts(net, data, "features.8", k=K, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_ranks_the_planted_square_first(biased, found, method):
    m = biased[3]
    top = next(c for c in found[1] if c.kind == method)
    ref, clean = top.reference_indices, top.clean_indices
    carries = m.flatten(1).amax(1) > 0
    assert carries[ref].float().mean() >= 0.95 and not carries[clean].any()
    assert top.class_index == 0 and len(ref) >= K and len(clean) >= K
    assert top.preview.shape == (K, 1, SIZE, SIZE) and float(top.preview.amax()) == pytest.approx(1.0)
    assert _iou(top.preview, m[ref[:K]]) > 0.3
    assert top.patches is not None and top.patches.shape[0] == K and 0.0 <= top.score <= 1.0


def test_candidates_are_sorted_and_the_first_is_the_square(biased, found):
    _, _, _, m = biased
    cands = found[1]
    assert {c.kind for c in cands} == set(METHODS)
    scores = [c.score for c in cands]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert (m[cands[0].reference_indices].flatten(1).amax(1) > 0).all()
    assert all(c.layer == "features.8" for c in cands)
    assert max(len([c for c in cands if c.kind == k]) for k in METHODS) <= 5


def test_discovery_leaves_the_model_as_it_was(biased):
    net, x, _, _ = biased
    net.train()
    try:
        before = {k: v.clone() for k, v in net.state_dict().items()}
        discover_artifacts(net, x[:64], "features.8", methods=("channels",), k=K, progress=False)
        assert net.training and hook_count(net) == 0
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    finally:
        net.eval()


@pytest.mark.parametrize("method", METHODS)
def test_candidate_to_concept_mask_masks_the_square(biased, found, method):
    net, x, y, m = biased
    data, cands = found
    top = next(c for c in cands if c.kind == method)
    cm = top.to_concept_mask(net, data)
    art = (m.flatten(1).amax(1) > 0).nonzero()[:40, 0]
    assert _iou(cm(x[art]).float(), m[art]) > 0.3
    clean = (y == 1).nonzero()[:40, 0]
    assert float(cm(x[clean]).float().mean()) < 0.02


def test_select_images_reads_data_in_order(biased):
    _, x, y, _ = biased
    data = [{"image": x[i : i + 10], "label": y[i : i + 10]} for i in range(0, 50, 10)]
    assert torch.equal(select_images(data, [33, 2, 17]), x[[33, 2, 17]])
    assert torch.equal(select_images(x, torch.tensor([4, 0])), x[[4, 0]])
    with pytest.raises(ValueError, match="index 60 but data has 50"):
        select_images(data, [60])


def test_save_candidates_writes_figures_and_json(biased, found, tmp_path):
    _, x, _, _ = biased
    paths = save_candidates(found[1], x, tmp_path, top=2)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["candidate_0.png", "candidate_1.png", "candidates.json"]
    rows = json.loads((tmp_path / "candidates.json").read_text())
    assert len(rows) == len(found[1]) and rows[0]["figure"] == "candidate_0.png" and rows[2]["figure"] is None
    assert rows[0]["reference_indices"] == found[1][0].reference_indices.tolist()
    assert {"kind", "score", "class_index", "channels", "mode", "clean_indices", "details"} <= set(rows[0])
    with pytest.raises(ValueError, match="top must be"):
        save_candidates(found[1], x, tmp_path, top=0)


# ----------------------------------------------------------------------------------------------- score pieces
def test_concentration_hand_values():
    uniform = torch.ones(1, 1, 4, 4)
    spike = torch.zeros(1, 1, 4, 4)
    spike[0, 0, 1, 2] = 3.0
    half = torch.zeros(1, 1, 4, 4)
    half[..., :2, :] = 1.0  # Gini of 8 equal values among 16: 1/2
    vals = concentration(torch.cat([uniform, spike, half, torch.zeros(1, 1, 4, 4)]))
    assert torch.allclose(vals, torch.tensor([0.0, 15 / 16, 0.5, 0.0]))
    big = torch.zeros(1, 1, 64, 64)
    big[..., :4, :4] = 1.0  # pooled to 16×16: one cell of 256
    assert float(concentration(big)[0]) == pytest.approx(255 / 256)


def test_split_examples_hand_example():
    score = torch.tensor([9.0, 8.0, 8.5, 0.1, 0.2, 4.0, 0.0, 0.3])
    labels = torch.tensor([0, 0, 0, 0, 1, 0, 1, 1])
    inp = Inputs(x=torch.zeros(8, 1, 2, 2), labels=labels, layer="l", patch=1, mu=torch.zeros(1), sd=torch.ones(1),
                 k=2, n_examples=3, chunk=8, seed=0, progress=False)
    ref, clean = split_examples(score, labels, 0, inp)
    assert ref.tolist() == [0, 2, 1]
    # 4.0 (image 5) is a weak second mode: never clean; only one class-0 image is clean, so any class
    assert clean.tolist() == [6, 3, 4]
    ref, clean = split_examples(score, labels, 1, inp, reference=torch.tensor([0]))
    assert ref.tolist() == [0] and clean.tolist() == [6, 4, 7]


def test_eigengap_finds_three_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    v = torch.cat([c + 0.1 * torch.randn(20, 3, generator=g) for c in centres])
    labels = eigengap_clusters(v, max_clusters=8, seed=0)
    assert len(labels.unique()) == 3
    assert all(len(labels[i * 20 : (i + 1) * 20].unique()) == 1 for i in range(3))


# ----------------------------------------------------------------------------------------------- verification
def test_artifact_patch_hand_example():
    x = torch.arange(3 * 36, dtype=torch.float32).view(3, 1, 6, 6)
    m = torch.zeros(4, 1, 6, 6)
    m[0, 0, 1:3, 1:3] = 1  # 2×2
    m[1, 0, 0:2, 3:6] = 1  # 2×3
    m[2, 0, 3:5, 0:2] = 1  # 2×2
    x = torch.cat([x, torch.zeros(1, 1, 6, 6)])  # image 3: empty mask, ignored
    assert torch.equal(artifact_patch(x, m), x[0, :, 1:3, 1:3])
    m2 = torch.zeros(3, 6, 6)
    m2[0, 0:3, 0:3] = 1  # 3×3
    m2[1, 4:6, 4:6] = 1  # 2×2
    m2[2, 2:5, 3:6] = 1  # 3×3: median 3×3, the first one
    assert torch.equal(artifact_patch(x[:3], m2), x[0, :, 0:3, 0:3])
    with pytest.raises(ValueError, match="empty for every image"):
        artifact_patch(x, torch.zeros(4, 1, 6, 6))
    with pytest.raises(ValueError, match="masks must be"):
        artifact_patch(x, torch.zeros(4, 1, 5, 6))


def test_paste_hand_example():
    imgs = torch.zeros(2, 1, 4, 4)
    out = paste(imgs, torch.ones(1, 2, 2) * 7, torch.tensor([[0, 2], [2, 0]]))
    assert out[0, 0, 0:2, 2:4].eq(7).all() and out[1, 0, 2:4, 0:2].eq(7).all() and out.sum() == 7 * 8
    assert imgs.sum() == 0


def test_insertion_effect_on_a_linear_model_matches_hand_computation():
    torch.manual_seed(0)
    c, h, w = 2, 5, 6
    lin = nn.Linear(c * h * w, 3, bias=False)
    with torch.no_grad():
        lin.weight[0] = 1.0  # logit 0: the image's sum
        lin.weight[1] = -0.5
        lin.weight[2] = torch.arange(c * h * w, dtype=torch.float32) / 10  # position-dependent
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(3, c, h, w)
    patch = torch.rand(c, 2, 3) + 1.0
    res = insertion_effect(model, x, patch, target=0, n_positions=5, seed=3, chunk=4)
    where = res["positions"]
    assert where.shape == (3, 5, 2)
    t, q = where[..., 0], where[..., 1]
    assert ((t == 0) | (t == h - 2) | (q == 0) | (q == w - 3)).all()  # on the border
    deltas = []
    for i in range(3):
        for p in range(5):
            y = x[i].clone()
            y[:, t[i, p] : t[i, p] + 2, q[i, p] : q[i, p] + 3] = patch
            deltas.append(lin.weight.detach() @ (y - x[i]).flatten())
    d = torch.stack(deltas).double().mean(0)
    assert res["per_class"] == pytest.approx(d.tolist(), rel=1e-5)
    assert res["excitation"] == pytest.approx(float(d[0]), rel=1e-5)
    assert res["inhibition"] == pytest.approx(float((d[1] + d[2]) / 2), rel=1e-5)
    assert res["abs_inhibition"] == pytest.approx(abs(res["inhibition"]))
    assert res["n_images"] == 3 and res["n_positions"] == 5
    again = insertion_effect(model, x, patch, target=0, n_positions=5, seed=3, chunk=1000)
    assert torch.equal(again["positions"], where) and again["excitation"] == pytest.approx(res["excitation"])


def test_insertion_effect_on_the_biased_net_excites_and_inhibits(biased):
    net, x, y, m = biased
    ref = (y == 0).nonzero()[:10, 0]
    patch = artifact_patch(x[ref], m[ref])
    assert patch.shape == (3, SQ, SQ)
    res = insertion_effect(net, x[y == 1][:40], patch, target=0)
    assert res["excitation"] > 0 > res["inhibition"]


def test_patch_files_round_trip(tmp_path):
    p = torch.rand(3, 4, 5)
    assert torch.equal(load_patch(save_patch(p, tmp_path / "a.safetensors")), p)
    torch.save({"patch": p}, tmp_path / "b.pt")
    assert torch.equal(load_patch(tmp_path / "b.pt"), p)
    with pytest.raises(ValueError, match="does not exist"):
        load_patch(tmp_path / "missing.safetensors")
    (tmp_path / "c.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="must end in"):
        load_patch(tmp_path / "c.npy")
    torch.save({"a": p, "b": p}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="key 'patch'"):
        load_patch(tmp_path / "d.pt")


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors(biased):
    net, x, y, _ = biased
    data = [(x[:64], y[:64])]
    with pytest.raises(ValueError, match="methods must be"):
        discover_artifacts(net, data, "features.8", methods=("sprya",), progress=False)
    with pytest.raises(ValueError, match=r"features\.88"):
        discover_artifacts(net, data, "features.88", progress=False)
    with pytest.raises(ValueError, match=r"\['codec', 'spray'\] need labelled data"):
        discover_artifacts(net, x[:64], "features.8", progress=False)
    with pytest.raises(ValueError, match="k=65 exceeds the number of images"):
        discover_artifacts(net, data, "features.8", k=65, methods=("channels",), progress=False)
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        discover_artifacts(net, data, "features.8", k=1, progress=False)
    with pytest.raises(ValueError, match="2k = 80 images of some class"):
        discover_artifacts(net, data, "features.8", k=40, methods=("spray",), progress=False)
    with pytest.raises(ValueError, match="labels contain class 2 but num_classes=2"):
        discover_artifacts(net, [(x[:8], y[:8] * 0 + 2)], "features.8", k=2, progress=False)
    with pytest.raises(ValueError, match="num_classes=3 but the model returns 2 logits"):
        discover_artifacts(net, data, "features.8", num_classes=3, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        discover_artifacts(net, x[:8] * float("nan"), "features.8", methods=("channels",), k=2, progress=False)
    patch = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match="patch must be"):
        insertion_effect(net, x[:4], torch.rand(1, 4, 4), target=0)
    with pytest.raises(ValueError, match="larger than the images"):
        insertion_effect(net, x[:4], torch.rand(3, 20, 4), target=0)
    with pytest.raises(ValueError, match=r"target must be a class index in \[0, 2\)"):
        insertion_effect(net, x[:4], patch, target=2)
    with pytest.raises(ValueError, match="n_positions must be a positive int"):
        insertion_effect(net, x[:4], patch, target=0, n_positions=0)


def test_artifact_insertion_callback_logs_on_the_no_bias_loader(tmp_path, biased):
    import lightning as L

    from negspace.callbacks import ArtifactInsertion
    from negspace.data_modules import SyntheticLesionDataModule
    from negspace.modules import ClassifierModule

    dm = SyntheticLesionDataModule(n_train=32, n_val=16, n_test=0, image_size=16, batch_size=16, augment=False)
    module = ClassifierModule(model=XSmallCNN(2, 3, 4), num_classes=2)
    patch = torch.ones(3, 3, 3)
    save_patch(patch, tmp_path / "patch.safetensors")
    cb = ArtifactInsertion(str(tmp_path / "patch.safetensors"), target=0, n_images=10, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=1)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    no_bias = torch.cat([b["image"] for b in dm.val_dataloader()[2]])[:10]
    expect = insertion_effect(module.model, no_bias, patch, target=0)
    assert float(metrics["artifact/excitation"]) == pytest.approx(expect["excitation"], rel=1e-4, abs=1e-6)
    assert float(metrics["artifact/inhibition"]) == pytest.approx(expect["inhibition"], rel=1e-4, abs=1e-6)
    assert cb.result is not None and cb.result["n_images"] == 10
    with pytest.raises(ValueError, match="patch must be a Tensor"):
        ArtifactInsertion(torch.rand(4, 4), target=0)
    with pytest.raises(ValueError, match="target must be a class index"):
        ArtifactInsertion(patch, target=-1)


# ----------------------------------------------------------------------------------------------- CLI
def test_negspace_discover_cli(tmp_path, capsys):
    from negspace.cli import run_cli
    from negspace.masks import ConceptMask
    from negspace.modules import ClassifierModule

    recipe = {
        "seed_everything": 0,
        "model": {"model": {"class_path": "negspace.models.xmodels.XSmallCNN",
                            "init_args": {"num_classes": 2, "in_channels": 3, "width": 4}}, "num_classes": 2},
        "data": {"class_path": "negspace.data_modules.SyntheticLesionDataModule",
                 "init_args": {"n_train": 48, "n_val": 16, "n_test": 0, "image_size": 16, "batch_size": 16,
                               "augment": False}},
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False},
    }  # fmt: skip
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    torch.manual_seed(1)
    module = ClassifierModule(model=XSmallCNN(2, 3, 4), num_classes=2)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "biased.ckpt")
    out = tmp_path / "out"
    res = run_cli(["discover", "--config", str(cfg), "--ckpt_path", str(tmp_path / "biased.ckpt"), "--layer",
                   "features.8", "--methods", "channels,spray", "--top", "2", "--k", "4", "--out", str(out),
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert "| rank | kind | score | class | description | file |" in printed
    assert "class_path: negspace.masks.ConceptMask" in printed and "candidate_0.safetensors" in printed
    assert len(res["masks"]) == 2 and all(isinstance(c, Candidate) for c in res["candidates"])
    for name in ("candidate_0.png", "candidate_1.png", "candidates.json", "candidate_0.safetensors",
                 "candidate_0.json"):
        assert (out / name).is_file(), name
    cm = ConceptMask(file=str(out / "candidate_0.safetensors"))
    assert cm.layer == "features.8"
    assert {c.kind for c in res["candidates"]} <= {"channels", "spray"}
    # the mask's frozen reference is the checkpoint's network (not the recipe's fresh init)
    from safetensors.torch import load_file

    saved = load_file(str(out / "candidate_0.safetensors"))
    assert torch.equal(saved["reference.features.0.weight"], module.model.features[0].weight)
    assert load_patch(out / "candidate_0_patch.safetensors").shape[0] == 3
    with pytest.raises(ValueError, match="--split must be"):
        run_cli(["discover", "--config", str(cfg), "--layer", "features.8", "--split", "bogus", "--out", str(out)])
