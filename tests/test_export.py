"""usi-export and usi-eval: a trained student leaves the recipe in timm's Hugging Face layout, timm builds it
from the folder, the recipe takes it back as model.checkpoint and teacher.checkpoint, and both usi-eval and a
plain timm evaluation score what training reported for those weights."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from composer.loggers import InMemoryLogger
from PIL import Image
from safetensors.torch import load_file
from timm.data import CustomDatasetInfo, ImageNetInfo, create_transform, resolve_data_config

from helpers import REPO, one_error_line, run_cli, with_code
from usi_composer.algorithms import KnowledgeDistillation
from usi_composer.builders import build_algorithms, build_model
from usi_composer.cli import eval as eval_cli
from usi_composer.cli import export as export_cli
from usi_composer.config import load_config
from usi_composer.data.convert import convert_imagenet
from usi_composer.models import save_weights, trained_weights
from usi_composer.plan import resolve
from usi_composer.training import train

DEMO = str(REPO / "yamls" / "demo.yaml")


def overrides(digits: Path, *extra: str) -> list[str]:
    """The demo student (resnet10t, EMA with BestOfEMAAndRaw, channels-last) on the digits folders, without
    the teacher, 2 epochs of 8 batches, evaluated after each; an eval transform that resizes and crops (the
    digits are 32 px) with an interpolation and normalization other than timm's defaults for resnet10t."""
    return [
        "data.local=null",
        f"data.train_dir={digits / 'train'}",
        f"data.val_dir={digits / 'val'}",
        "algorithms.distillation.enabled=false",
        "data.image_size=24",
        "data.crop_pct=0.875",
        "data.interpolation=bilinear",
        "algorithms.ema.decay=0.999",  # a slow average: the raw weights end ahead, BestOfEMAAndRaw keeps them
        # 16 steps that learn (raw top-1 ~0.8): a 1-batch warm-up, a higher rate, no MixUp/CutMix nor RandAugment
        "scheduler.warmup=1ba",
        "optimizer.lr=8e-3",
        "algorithms.mixup_cutmix.enabled=false",
        "data.auto_augment=null",
        "trainer.train_subset_num_batches=8",
        "trainer.max_duration=2ep",
        "trainer.progress_bar=false",
        *extra,
    ]


@dataclass
class Run:
    overrides: list[str]
    checkpoints: Path
    reported: dict[str, list[float]]  # what training logged, per evaluation
    raw: dict[str, torch.Tensor]  # the training weights at the end
    weights_file: Path  # save_weights' file


@pytest.fixture(scope="module")
def run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("run")
    args = overrides(digits, f"trainer.save_folder={folder / 'checkpoints'}", "trainer.run_name=export")
    logger = InMemoryLogger()
    trainer = train(load_config(DEMO, args), loggers=[logger])
    reported = {key: [float(v) for _, v in values] for key, values in logger.data.items() if key.startswith("metrics/")}
    raw = {k: v.detach().clone() for k, v in trainer.state.model.module.state_dict().items()}
    save_weights(trainer, folder / "student.safetensors")
    trainer.close()
    assert reported["metrics/eval_best/is_ema"][-1] == 0.0, "the setup: the raw weights win the final evaluation"
    return Run(args, folder / "checkpoints", reported, raw, folder / "student.safetensors")


def call(main, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(run: Run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """usi-export of the run's latest checkpoint (the default: trainer.save_folder's latest-rank0.pt)."""
    folder = tmp_path_factory.mktemp("export") / "resnet10t-digits"
    code, out, err = call(export_cli.main, DEMO, *run.overrides, "--out", str(folder))
    assert code == 0, err
    return folder, out


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "other weights"


# --------------------------------------------------------------------------- the export


@pytest.mark.slow
def test_export_holds_the_kept_weights_and_the_recipes_eval_transform(run: Run, exported: tuple[Path, str]) -> None:
    folder, out = exported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")], "no staging folder left"
    assert "the raw training weights (epoch 2, batch 16): BestOfEMAAndRaw found them better" in out, out
    # The kept weights: BestOfEMAAndRaw wrote the raw ones into the EMA storage; save_weights agrees
    assert_same(load_file(folder / "model.safetensors"), run.raw)
    assert_same(load_file(run.weights_file), run.raw)
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"]) == ("resnet10t", 10)
    pretrained = config["pretrained_cfg"]
    expected = {
        "input_size": [3, 24, 24],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "num_classes": 10,
        "custom_load": False,
    }
    assert {k: pretrained.get(k) for k in expected} == expected
    # timm's published resnet10t weights' entries are not ours
    assert not {"tag", "license", "test_input_size", "test_crop_pct", "hf_hub_id", "url"} & set(pretrained)
    assert pretrained["label_names"] == [str(d) for d in range(10)], "the digits' class folders"
    card = (folder / "README.md").read_text()
    best = run.reported["metrics/eval_best/top1"][-1]  # the kept (raw) weights' score: the checkpoint's
    assert f"- top-1: {best:.4f} on {run.overrides[2].split('=', 1)[1]} (the run's last evaluation" in card, card
    assert f"top-1 {best:.4f} (the run's last evaluation)" in out, out


@pytest.mark.slow
def test_timm_builds_it_from_the_folder_and_scores_what_training_reported(
    run: Run, exported: tuple[Path, str], digits: Path
) -> None:
    """timm's local-dir: source reads config.json as its hf-hub: source does (timm 1.0.31 _hub.py:
    load_model_config_from_path, _parse_model_cfg), without network. A plain timm evaluation: timm's eval
    transform from the exported pretrained_cfg, a loop over the val folder, no recipe code.

    Tolerance: the pixels are the same (timm's Resize + CenterCrop on the same PNGs, in both pipelines),
    normalization differs in float rounding only (ToTensor + Normalize per image here, one multiply-add
    per batch in the recipe) and the model runs contiguous here, channels-last in the recipe: logits agree
    to ~1e-5, so a prediction can only differ where its top two logits are closer than 1e-3; top-1 may
    differ by at most those samples (none, in practice).
    """
    folder, _ = exported
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert_same(model.state_dict(), run.raw)
    data_config = resolve_data_config(model=model)
    assert data_config["input_size"] == (3, 24, 24) and data_config["interpolation"] == "bilinear"
    transform = create_transform(**data_config)  # eval: Resize(27), CenterCrop(24), ToTensor, Normalize
    val = digits / "val"
    classes = sorted(p.name for p in val.iterdir() if p.is_dir())  # the training folder's order, as the recipe's
    files = sorted(val.glob("*/*.png"))
    with torch.no_grad():
        logits = torch.cat(
            [
                model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files[i : i + 128]]))
                for i in range(0, len(files), 128)
            ]
        )
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    top2 = logits.topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-3).sum())
    top1 = float((logits.argmax(1) == labels).float().mean())
    reported = run.reported["metrics/eval_best/top1"][-1]  # training's number for the kept (raw) weights
    assert len(files) == 450 and abs(top1 - reported) <= near_ties / len(files) + 1e-6, (top1, reported, near_ties)
    assert reported > 0.2, "a model that learned something (chance: 0.1), so that the comparison means something"


@pytest.mark.slow
def test_usi_eval_reproduces_trainings_numbers(run: Run, exported: tuple[Path, str], tmp_path: Path) -> None:
    """The same pipeline as training's evaluation: the same numbers, exactly, for every form of the weights."""
    folder, _ = exported
    best_top1, raw_top5 = run.reported["metrics/eval_best/top1"][-1], run.reported["metrics/eval_raw/top5"][-1]
    for checkpoint in (None, str(folder), str(run.weights_file)):
        metrics = tmp_path / "metrics.json"
        given = ["--checkpoint", checkpoint] if checkpoint else []  # None: the run's latest checkpoint
        code, out, err = call(eval_cli.main, DEMO, *run.overrides, *given, "--metrics-out", str(metrics))
        assert code == 0, err
        result = json.loads(metrics.read_text())
        assert result["samples"] == 450
        assert (result["metrics/eval/top1"], result["metrics/eval/top5"]) == (best_top1, raw_top5), checkpoint
        assert f"top-1 {best_top1:.4f}  top-5 {raw_top5:.4f}  (450 images of " in out
    # After epoch 1 the EMA weights were evaluated (and checkpointed: Composer swaps them in), not yet replaced
    ep1 = run.checkpoints / "ep1-ba8-rank0.pt"
    code, out, err = call(eval_cli.main, DEMO, *run.overrides, "--checkpoint", str(ep1), "--metrics-out", str(metrics))
    assert code == 0, err
    result = json.loads(metrics.read_text())
    assert result["weights"].startswith("the EMA weights (epoch 1, batch 8)"), result["weights"]
    reported = (run.reported["metrics/eval/top1"][0], run.reported["metrics/eval/top5"][0])
    assert (result["metrics/eval/top1"], result["metrics/eval/top5"]) == reported
    assert run.reported["metrics/eval_raw/top1"][0] != reported[0], "EMA and raw weights told apart"


def test_a_run_in_batches_checkpoints_the_weights_its_last_evaluation_kept(digits: Path, tmp_path: Path) -> None:
    """``max_duration`` in batches ends mid-epoch: the last evaluation comes before the last checkpoint, once,
    so the checkpoint holds BestOfEMAAndRaw's choice and usi-eval scores what ``eval_best`` reported."""
    args = overrides(digits, f"trainer.save_folder={tmp_path / 'checkpoints'}", "trainer.run_name=batches")
    args = [*args, "trainer.max_duration=12ba"]  # one epoch of 8 batches and half of the next
    logger = InMemoryLogger()
    trainer = train(load_config(DEMO, args), loggers=[logger])
    trainer.close()
    reported = {key: [float(v) for _, v in values] for key, values in logger.data.items() if key.startswith("metrics/")}
    assert len(reported["metrics/eval_best/top1"]) == 2, "after epoch 1 and after batch 12, each once"
    state = torch.load(tmp_path / "checkpoints" / "ep1-ba12-rank0.pt", weights_only=False)["state"]["callbacks"]
    final = {"ema": reported["metrics/eval/top1"][-1], "raw": reported["metrics/eval_raw/top1"][-1]}
    assert state["BestOfEMAAndRaw"]["scores"]["eval"] == final, "the final evaluation's choice is in the checkpoint"
    metrics = tmp_path / "metrics.json"
    code, _, err = call(eval_cli.main, DEMO, *args, "--metrics-out", str(metrics))
    assert code == 0, err
    assert json.loads(metrics.read_text())["metrics/eval/top1"] == reported["metrics/eval_best/top1"][-1]


@pytest.mark.slow
def test_usi_eval_reads_the_mds_split_as_training_would(
    run: Run, exported: tuple[Path, str], digits: Path, tmp_path: Path
) -> None:
    """The demo's own data path: the digits as MDS shards (data.local, data.streaming.val_split)."""
    folder, _ = exported
    mds = tmp_path / "digits-mds"
    convert_imagenet(digits, str(mds), workers=1, progress=False)  # complete splits are reused
    streaming = [*run.overrides, "data.train_dir=null", "data.val_dir=null", f"data.local={mds}"]
    code, out, err = call(eval_cli.main, DEMO, *streaming, "--checkpoint", str(folder))
    assert code == 0, err
    best = run.reported["metrics/eval_best/top1"][-1]
    assert out.startswith(f"top-1 {best:.4f}  ") and f"(450 images of {mds}/val)" in out, out


@pytest.mark.slow
def test_the_export_is_a_model_and_a_teacher_checkpoint(run: Run, exported: tuple[Path, str]) -> None:
    folder, _ = exported
    weights = str(folder / "model.safetensors")
    student = build_model(load_config(DEMO, [*run.overrides, f"model.checkpoint={weights}"]))
    assert_same(student.module.state_dict(), run.raw)
    cfg = load_config(
        DEMO,
        [
            *run.overrides,
            "algorithms.distillation.enabled=true",
            "teacher.name=resnet10t",
            f"teacher.checkpoint={weights}",
        ],  # demo.yaml's teacher.mean/std: the student's, as the export's pretrained_cfg says
    )
    algorithms = build_algorithms(cfg, resolve(cfg))
    teacher = next(a for a in algorithms if isinstance(a, KnowledgeDistillation)).teacher
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), atol=1e-4, rtol=1e-4)  # BN folded: rounding apart


# --------------------------------------------------------------------------- checkpoints, folders, the hub


def test_composer_checkpoints_give_their_ema_weights() -> None:
    """Composer checkpoints as the recipe writes them: the EMA weights swapped into state.model, or held in
    the EMA's storage (under DDP named with the wrapper's prefix); no EMA, or not started: the model's."""
    g = torch.Generator().manual_seed(0)
    raw = {"module.fc.weight": torch.randn(2, 3, generator=g), "module.bn.running_mean": torch.randn(2, generator=g)}
    ema = {k: v + 1 for k, v in raw.items()}

    def checkpoint(model, stored, active: bool, started: bool = True, best: str | None = None, prefix: str = ""):
        storage = {"named_parameters_dict": {}, "named_buffers_dict": {f"{prefix}{k}": v for k, v in stored.items()}}
        algorithms = [("FusedEMA", {"ema_model": storage, "ema_weights_active": active, "ema_started": started})]
        callbacks = {"BestOfEMAAndRaw": {"metric": "top1", "best": best, "scores": {}}} if best else {}
        stamp = {"Timestamp": {"epoch": 3, "batch": 30}}
        return {"state": {"model": model, "algorithms": algorithms, "callbacks": callbacks, "timestamp": stamp}}

    plain = {k.removeprefix("module."): v for k, v in ema.items()}
    weights, which = trained_weights(checkpoint(ema, raw, active=True))
    assert_same(weights, plain)
    assert which == "the EMA weights (epoch 3, batch 30)"
    for prefix in ("", "module."):  # module.: DDP around the ComposerClassifier
        weights, which = trained_weights(checkpoint(raw, ema, active=False, prefix=prefix))
        assert_same(weights, plain)
    weights, which = trained_weights(checkpoint(raw, ema, active=False, started=False))
    assert_same(weights, {k.removeprefix("module."): v for k, v in raw.items()})
    assert which == "the training weights (epoch 3, batch 30): EMA had not started"
    weights, which = trained_weights(checkpoint(raw, raw, active=True, best="raw"))  # BestOfEMAAndRaw's copy
    assert which.startswith("the raw training weights (epoch 3, batch 30): BestOfEMAAndRaw found them better")
    assert trained_weights(checkpoint(ema, raw, active=True, best="raw"))[1].startswith("the EMA weights")
    no_ema = checkpoint(raw, ema, active=False)
    no_ema["state"]["algorithms"] = [("ChannelsLast", {"repr": "ChannelsLast()"})]
    assert trained_weights(no_ema)[1] == "the training weights (epoch 3, batch 30): the run had no EMA"
    nested = {f"module.module.{k}": v for k, v in plain.items()}  # save_weights under DDP
    assert_same(trained_weights(nested)[0], plain)


def test_export_refuses_code_unless_trusted(saved_teacher, tmp_path: Path) -> None:
    weights = torch.load(saved_teacher("resnet10t", 10), weights_only=True)
    marker = tmp_path / "ran"
    unsafe = with_code({"state_dict": weights}, tmp_path / "unsafe.pt", marker)
    out = tmp_path / "export"
    code, _, err = call(export_cli.main, DEMO, "--checkpoint", str(unsafe), "--out", str(out))
    assert code == 2 and not marker.exists() and not out.exists()
    assert one_error_line(err).endswith("if you trust this file, pass --trust-checkpoint"), err
    code, _, err = call(export_cli.main, DEMO, "--checkpoint", str(unsafe), "--out", str(out), "--trust-checkpoint")
    assert code == 0 and marker.exists(), err
    assert_same(load_file(out / "model.safetensors"), weights)


def test_export_replaces_an_export_only_when_asked(saved_teacher, tmp_path: Path) -> None:
    checkpoint = str(saved_teacher("resnet10t", 10))
    out = tmp_path / "export"
    assert call(export_cli.main, DEMO, "--checkpoint", checkpoint, "--out", str(out))[0] == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = call(export_cli.main, DEMO, "data.image_size=48", "--checkpoint", checkpoint, "--out", str(out))
    assert code == 2 and "pass --overwrite to replace them" in one_error_line(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "left as it was"
    args = ["data.image_size=48", "--checkpoint", checkpoint, "--out", str(out), "--overwrite"]
    assert call(export_cli.main, DEMO, *args)[0] == 0
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 48, 48]
    assert (out / "notes.txt").read_text() == "mine", "other files kept"
    assert "48 px" in (out / "README.md").read_text(), "the model card replaced too"
    modes = {(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert len(modes) == 1, "model.safetensors as readable as the files the umask makes (safetensors: 0600)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no staging folder left"


def test_config_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    code, _, err = call(export_cli.main, DEMO, "--out", str(tmp_path / "x"))  # no checkpoint, no save_folder
    assert code == 2 and "trainer.save_folder: is unset: pass --checkpoint" in one_error_line(err)
    code, _, err = call(eval_cli.main, DEMO, "data.local=null", "data.train_dir=t", "--checkpoint", "missing.pt")
    assert code == 2 and "data.val_dir: is unset" in one_error_line(err)
    code, _, err = call(eval_cli.main, DEMO, "data.streaming.val_split=null", "--checkpoint", "missing.pt")
    assert code == 2 and "data.streaming.val_split: is null" in one_error_line(err)
    code, _, err = call(eval_cli.main, DEMO, "model.name=resnet10", "--checkpoint", "missing.pt")
    assert code == 2 and "unknown timm model 'resnet10'" in one_error_line(err)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_push_to_the_hub_offline_fails_in_one_line_after_the_export(saved_teacher, tmp_path: Path) -> None:
    """No test reaches the hub: HF_HUB_OFFLINE makes huggingface_hub refuse every request, as a machine
    without network would (more slowly) too. The local export is complete; the failure is one line."""
    out = tmp_path / "export"
    args = ["--checkpoint", str(saved_teacher("resnet10t", 10)), "--out", str(out), "--push-to-hub", "someone/x"]
    done = run_cli("-m", "usi_composer.cli.export", DEMO, *args, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, done.stderr[-3000:]
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: could not push {out} to the Hugging Face hub as someone/x (no connection"), line
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert f"exported resnet10t (10 classes) to {out}" in done.stdout


# --------------------------------------------------------------------------- label names, the model card


@pytest.mark.parametrize("data", ["folders", "mds"])
def test_export_carries_the_label_names_and_a_model_card(
    data: str, image_folders, mds_dataset, saved_teacher, tmp_path: Path
) -> None:
    """timm's convention: ``pretrained_cfg["label_names"]`` (the wnids, in label order) and
    ``label_descriptions`` (wnid -> name, where the MDS root's classes.json has names), which timm's
    ``CustomDatasetInfo`` reads; README.md says what the model is and how to evaluate it with timm."""
    root = image_folders(5) if data == "folders" else mds_dataset(5)
    where = [f"data.train_dir={root / 'train'}", "data.local=null"] if data == "folders" else [f"data.local={root}"]
    weights, out = saved_teacher("resnet10t", 5), tmp_path / "export"
    args = [*where, "data.num_classes=5", "data.image_size=64", "--checkpoint", str(weights), "--out", str(out)]
    code, printed, err = call(export_cli.main, DEMO, *args)
    assert code == 0, err
    wnids = sorted(p.name for p in (image_folders(5) / "train").iterdir())
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == wnids
    descriptions = model.pretrained_cfg.get("label_descriptions")
    if data == "mds":  # classes.json's names: timm's ImageNet descriptions
        assert descriptions == {w: ImageNetInfo().label_name_to_description(w) for w in wnids}
        info = CustomDatasetInfo(model.pretrained_cfg["label_names"], descriptions)
        assert info.index_to_description(0) == "tench, Tinca tinca"
    else:
        assert descriptions is None, "folders name their classes only"
    assert f"label names: 5 from {root / 'train' if data == 'folders' else root / 'classes.json'}" in printed
    card = (out / "README.md").read_text()
    assert card.startswith("# resnet10t, trained with USI\n")
    assert "- student: `resnet10t`, 64 px\n- teacher: `resnet18` (" in card
    assert "; 5 classes (label names from " in card
    assert f"- weights: its state dict, from {weights}\n- top-1: not measured" in card, card
    assert f"python validate.py VAL_DIR --model local-dir:{out} --pretrained" in card


def test_export_without_the_data_writes_no_label_names(saved_teacher, tmp_path: Path) -> None:
    """A data root that is not on this machine, or lists other classes: no names rather than wrong ones."""
    weights = str(saved_teacher("resnet10t", 10))
    out = tmp_path / "export"
    code, printed, err = call(export_cli.main, DEMO, "data.local=nowhere", "--checkpoint", weights, "--out", str(out))
    assert code == 0, err
    assert "label_names" not in json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert "label names: none (no nowhere/classes.json)" in printed, printed
    assert "no label names: no nowhere/classes.json" in (out / "README.md").read_text()
