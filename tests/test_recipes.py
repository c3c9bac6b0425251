"""Every recipe in recipes/ runs through the `negspace` LightningCLI with fast_dev_run; the toy recipe
learns paper 000 §5.2's absence encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from negspace.cli import run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL_LESIONS = ["--data.init_args.n_train", "64", "--data.init_args.n_val", "16", "--data.init_args.n_test", "16",
                 "--data.init_args.batch_size", "16"]
FAST = ["--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]


def _run(command: str, recipe: str, tmp_path: Path, *extra: str):
    return run_cli([command, "--config", str(RECIPES / recipe), "--trainer.default_root_dir", str(tmp_path),
                    *FAST, *extra])


def test_every_recipe_is_covered():
    tested = {"lesions_none.yaml", "lesions_presence.yaml", "lesions_presence_absence.yaml",
              "lesions_unbiased.yaml", "motion_detector.yaml", "toy_green_pixel.yaml", "my_dataset_template.yaml",
              "finetune_presence_absence.yaml", "lesions_maskfree.yaml"}
    tested |= {f"compare_{m}.yaml" for m in ("rrr", "rrr_gradcam", "reweight", "groupdro", "jtt", "dfr")}  # test_robust
    assert {p.name for p in RECIPES.glob("*.yaml")} == tested


@pytest.mark.parametrize(
    "recipe", ["lesions_none.yaml", "lesions_presence.yaml", "lesions_presence_absence.yaml", "lesions_unbiased.yaml"]
)
def test_lesion_recipes_fast_dev_run(recipe, tmp_path):
    torch.manual_seed(0)
    cli = _run("fit", recipe, tmp_path, *SMALL_LESIONS)
    assert cli.trainer.state.finished
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "BiasedSplitReport")
    assert set(report.result) >= {"train_bias", "inverse_bias", "no_bias"}
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert ("AttributionPrior" in names) == ("presence" in recipe)
    # the prior's wrapper is gone after fit
    assert "training_step" not in cli.model.__dict__


def test_finetune_recipe_with_a_local_pretrained_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    pre = timm.create_model("resnet10t", num_classes=2)
    save_file(pre.state_dict(), str(tmp_path / "pre.safetensors"))
    cli = _run("fit", "finetune_presence_absence.yaml", tmp_path, *SMALL_LESIONS,
               "--model.pretrained_file", str(tmp_path / "pre.safetensors"))
    assert cli.trainer.state.finished
    assert cli.datamodule.normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # from the model
    assert [g["name"] for g in cli.trainer.optimizers[0].param_groups] == ["head", "backbone"]
    assert torch.equal(cli.model.model.conv1[0].weight, pre.conv1[0].weight)


def test_motion_recipe_validate_and_test(tmp_path):
    cli = _run("validate", "motion_detector.yaml", tmp_path)
    assert cli.trainer.state.finished
    cli = _run("test", "motion_detector.yaml", tmp_path)
    assert cli.trainer.callback_metrics["test/motion/acc"] == 1.0  # hand-set detector is exact


def test_green_pixel_recipe_fast_dev_run(tmp_path):
    cli = _run("fit", "toy_green_pixel.yaml", tmp_path, "--data.init_args.n_train", "512",
               "--data.init_args.n_val", "64", "--data.init_args.n_test", "64")
    assert cli.trainer.state.finished


def _write_image_folder(root: Path, n_per_class: int = 6, size: int = 16) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "images" / cls / f"img{i}.png")


def test_template_recipe_on_an_image_folder(tmp_path):
    _write_image_folder(tmp_path)
    cli = _run(
        "fit", "my_dataset_template.yaml", tmp_path,
        "--data.init_args.dataset.init_args.root", str(tmp_path / "images"),
        "--data.init_args.dataset.init_args.size", "16",
        "--data.init_args.batch_size", "4",
        "--data.init_args.val_fraction", "0.34",
        "--model.model", "xsmallcnn",
        "--trainer.accelerator", "cpu",
    )
    assert cli.trainer.state.finished
    assert cli.datamodule.num_classes == 2


def absence_encoding(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, bool]:
    """Paper 000 §5.2 checks on a trained GreenPixelNet (class 0 = green pixel present, 1 = absent).

    The hidden channel ``g`` with the largest green-minus-red/blue weight reacts to green, the other one
    (``rb``) to red/blue; output 1 encodes the absence of green: positive weight from ``rb``, negative from ``g``;
    its mean logit is negative on green images and positive on the others.
    """
    w1 = model.conv1.weight.detach().flatten(1)  # (2 hidden, 3 RGB)
    w2 = model.conv2.weight.detach().flatten(1)  # (2 outputs, 2 hidden)
    green_pref = w1[:, 1] - (w1[:, 0] + w1[:, 2]) / 2
    g = int(green_pref.argmax())
    rb = 1 - g
    with torch.no_grad():
        out = model(images)
    return {
        "hidden g reacts to green": bool(w1[g, 1] > 0 and w1[g, 1] > w1[g, 0] and w1[g, 1] > w1[g, 2]),
        "hidden rb reacts to red/blue": bool(w1[rb, 0] > 0 and w1[rb, 2] > 0 and w1[rb, 1] < w1[rb, 0]),
        "output 1 weight from rb > 0": bool(w2[1, rb] > 0),
        "output 1 weight from g < 0": bool(w2[1, g] < 0),
        "output 1 < 0 on green images": bool(out[labels == 0, 1].mean() < 0),
        "output 1 > 0 without green": bool(out[labels == 1, 1].mean() > 0),
        "accuracy > 0.9": bool((out.argmax(1) == labels).float().mean() > 0.9),
    }


def test_absence_encoding_check_on_hand_set_weights():
    from negspace.data_modules.toy import green_pixel_images
    from negspace.models.toy import GreenPixelNet

    x, y, _ = green_pixel_images(200, 32, 0)
    net = GreenPixelNet()
    with torch.no_grad():
        net.conv1.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]).view(2, 3, 1, 1))
        net.conv2.weight.copy_(torch.tensor([[1.0, 0.0], [-20.0, 1.0]]).view(2, 2, 1, 1))
    assert all(absence_encoding(net, x, y).values())
    with torch.no_grad():  # a net that only detects green has no absence encoding
        net.conv2.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]).view(2, 2, 1, 1))
    assert not all(absence_encoding(net, x, y).values())


@pytest.mark.slow
def test_green_pixel_recipe_learns_absence_encoding(tmp_path):
    """Train the recipe (paper B.2 settings, 15 epochs on 8000 images) and check §5.2's signs and weights."""
    cli = run_cli(["fit", "--config", str(RECIPES / "toy_green_pixel.yaml"),
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                   "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                   "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "15",
                   "--data.init_args.n_train", "8000"])
    ds = cli.datamodule._get("test")
    checks = absence_encoding(cli.model.model, ds.images, ds.labels)
    assert all(checks.values()), checks


@pytest.mark.slow
def test_maskfree_loop_fit_discover_fit(tmp_path, monkeypatch):
    """The recipe's three commands: a biased fit with a checkpoint, `negspace discover` on it, then the
    mask-free recipe reading the discovered files (relative paths, as written in the recipe)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    cli = run_cli(["fit", "--config", str(RECIPES / "lesions_none.yaml"), "--trainer.default_root_dir", "biased",
                   "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", *SMALL_LESIONS])
    ckpt = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    run_cli(["discover", "--config", str(RECIPES / "lesions_none.yaml"), "--ckpt_path", ckpt, "--layer", "features.8",
             "--methods", "channels", "--top", "1", "--no-progress", "--", *SMALL_LESIONS])
    assert (tmp_path / "negspace_discover" / "candidate_0.safetensors").exists()
    cli = _run("fit", "lesions_maskfree.yaml", tmp_path, *SMALL_LESIONS)
    assert cli.trainer.state.finished
    prior = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AttributionPrior")
    assert prior.feed.computed and prior.penalised_batches == 1
    masks = prior.feed.source(cli.datamodule.val_dataloader()[0].dataset[0]["image"][None])
    assert masks.shape == (1, 1, 32, 32)
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"ArtifactInsertion", "BiasedSplitReport"} <= names
