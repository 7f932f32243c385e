"""Any timm backbone at the data's size: one model of each family trains at the demo's 32 px;
a size a model cannot run, or weights of another architecture, stop before training with one line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import torch
from composer.loggers import InMemoryLogger

from usi_composer.cli.train import main
from usi_composer.config import ConfigError, load_config
from usi_composer.errors import CheckpointError, InputSizeError
from usi_composer.models import check_input_size, load_weights
from usi_composer.plan import resolve
from usi_composer.preflight import check_model_sizes
from usi_composer.teacher import build_teacher
from usi_composer.training import train

DEMO = "yamls/demo.yaml"

# The smallest timm variant of each family, and whether timm builds it for a size (img_size=).
FAMILIES = {
    "resnet": ("resnet10t", False),
    "efficientnet-mobilenet": ("mobilenetv3_small_050", False),
    "convnext": ("convnext_atto", False),
    "regnet": ("regnetx_002", False),
    "vit-deit": ("deit_tiny_patch16_224", True),
    "levit": ("levit_128s", True),
    "swin": ("swin_tiny_patch4_window7_224", True),
    "mlp-mixer": ("mixer_s16_224", True),
    "tresnet": ("tresnet_m", False),
}


def demo_overrides(digits: Path, *extra: str) -> list[str]:
    """The demo's student recipe at 32 px on its digits, shrunk to two batches of 8 without a teacher."""
    return [
        "data.local=null",
        f"data.train_dir={digits / 'train'}",
        "data.val_dir=null",
        "algorithms.distillation.enabled=false",
        "trainer.global_batch_size=8",
        "trainer.max_duration=2ba",
        "trainer.progress_bar=false",
        *extra,
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_at_32px(family: str, digits: Path) -> None:
    name, takes_img_size = FAMILIES[family]
    cfg = load_config(DEMO, demo_overrides(digits, f"model.name={name}"))
    assert cfg.data.image_size == 32
    (line,) = check_model_sizes(cfg, resolve(cfg))
    built = "built for 32 px (timm's img_size), runs at 32 px" if takes_img_size else "runs at 32 px (no img_size"
    assert line.startswith(f"student {name}: {built}"), line
    logger = InMemoryLogger()
    trainer = train(cfg, loggers=[logger])
    backbone = trainer.state.model.module
    before = timm.create_model(name, num_classes=10, **({"img_size": 32} if takes_img_size else {}))
    assert int(trainer.state.timestamp.batch) == 2
    totals = [float(v) for _, v in logger.data["loss/train/total"]]
    assert len(totals) == 2 and all(math.isfinite(v) for v in totals)
    shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    assert shapes == {k: v.shape for k, v in before.state_dict().items()}, "timm's model, built for 32 px"
    trainer.close()


def test_a_fixed_size_model_built_for_another_size_stops_unless_it_takes_any_size() -> None:
    with pytest.raises(InputSizeError) as error:
        check_input_size("deit_tiny_patch16_224", 32, 10, img_size=224)
    assert str(error.value).startswith("deit_tiny_patch16_224 built for 224 px cannot run at 32 px (")
    assert str(error.value).endswith("; built for 32 px it runs")
    assert check_input_size("deit_tiny_patch16_224", 32, 10, img_size=224, dynamic_img_size=True) is True
    assert check_input_size("resnet10t", 32, 10, img_size=224) is False


def test_sizes_that_run_are_the_nearest_ones() -> None:
    # LeViT's attention biases need a multiple of its 16 px patch; TResNet's space-to-depth a multiple of 4
    with pytest.raises(
        InputSizeError, match=r"^levit_128s cannot run at 40 px \(.*\); nearest sizes that run: 32 px or 48 px$"
    ):
        check_input_size("levit_128s", 40, 10)
    with pytest.raises(
        InputSizeError, match=r"^tresnet_m cannot run at 30 px \(.*\); nearest sizes that run: 24 px or 32 px$"
    ):
        check_input_size("tresnet_m", 30, 10)
    # EfficientFormer's last stage attends over a fixed 7x7 grid: no size near 32 px runs, timm's 224 does
    with pytest.raises(InputSizeError, match=r"no multiple of 8 px near it runs; timm's default size, 224 px, does$"):
        check_input_size("efficientformer_l1", 32, 10)


def test_img_size_is_validated_and_has_one_place() -> None:
    with pytest.raises(
        ConfigError, match=r"override 'teacher.img_size=4': teacher.img_size: must be >= 8 pixels, got 4"
    ):
        load_config(DEMO, ["teacher.img_size=4"])
    with pytest.raises(ConfigError, match=r"model.kwargs.img_size: set model.img_size instead"):
        load_config(DEMO, ["model.kwargs.img_size=32"])
    assert load_config(DEMO).model.img_size is None, "None: data.image_size"


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_cli_bad_student_size_is_one_line_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([DEMO, "model.name=levit_128s", "data.image_size=40"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert re.fullmatch(
        r"error: data\.image_size: levit_128s cannot run at 40 px \(RuntimeError: .+\); "
        r"nearest sizes that run: 32 px or 48 px",
        line,
    ), line


def test_cli_bad_teacher_size_is_one_line_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    # The demo's teacher weights need not exist: the sizes are checked before anything is loaded.
    assert main([DEMO, "teacher.name=mixer_s16_224", "teacher.img_size=8"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: teacher.img_size: mixer_s16_224 cannot run at 8 px ("), line
    assert line.endswith("; nearest sizes that run: 16 px"), line  # its 16 px patches


def test_cli_bad_teacher_size_from_the_data_names_teacher_img_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([DEMO, "teacher.name=levit_128s", "data.image_size=24", "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: data.image_size: levit_128s cannot run at 24 px ("), line
    assert line.endswith(
        "nearest sizes that run: 16 px or 32 px "
        "(or set teacher.img_size to one: the student's batch is resized for the teacher)"
    ), line


def test_dry_run_shows_the_size_of_each_model(digits: Path, saved_teacher, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = f"teacher.checkpoint={saved_teacher('resnet18', 10)}"
    overrides = demo_overrides(digits, "algorithms.distillation.enabled=true", teacher, "teacher.img_size=48")
    assert main([DEMO, "model.name=deit_tiny_patch16_224", *overrides, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "img_size: 48" in out
    assert err.strip().splitlines() == [
        "student deit_tiny_patch16_224: built for 32 px (timm's img_size), runs at 32 px",
        "teacher resnet18: runs at 48 px (no img_size in its timm constructor: any size it can)",
    ]


def torch_mismatch_counts(model: torch.nn.Module, state: dict) -> tuple[int, int, int]:
    """Missing, unexpected and mis-shaped keys as torch's own strict load counts them."""
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state)
    text = str(error.value)
    missing = re.search(r"Missing key\(s\) in state_dict: (.*?)\. ?\n", text + "\n")
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*?)\. ?\n", text + "\n")
    count = lambda m: len(m.group(1).split(", ")) if m else 0  # noqa: E731
    return count(missing), count(unexpected), text.count("size mismatch for ")


def test_weights_of_another_architecture_are_counted_as_torch_does(saved_teacher) -> None:
    path = saved_teacher("resnet18", 10)
    model = timm.create_model("resnet10t", num_classes=10)
    counts = torch_mismatch_counts(model, torch.load(path, weights_only=True))
    assert all(counts), counts  # this pair has keys of all three kinds
    with pytest.raises(CheckpointError) as error:
        load_weights(model, str(path), "resnet10t")
    message = str(error.value)
    assert "\n" not in message
    numbers = re.fullmatch(
        rf"{re.escape(str(path))} does not fit resnet10t: (\d+) missing \(first: conv1\.0\.weight\), "
        r"(\d+) unexpected \(first: conv1\.weight\), "
        r"(\d+) mis-shaped \(first: (\S+): \[.*\] in the file, \[.*\] in the model\)",
        message,
    )
    assert numbers, message
    assert tuple(int(n) for n in numbers.groups()[:3]) == counts


def test_cli_student_weights_of_another_architecture_are_one_line(
    digits: Path, saved_teacher, capsys: pytest.CaptureFixture[str]
) -> None:
    path = saved_teacher("resnet18", 10)
    args = demo_overrides(digits, "model.name=resnet10t", f"model.checkpoint={path}")
    assert main([DEMO, *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: model.checkpoint: {path} does not fit resnet10t: "), line
    assert re.search(r"\d+ missing \(first: .+\), \d+ unexpected \(first: .+\), \d+ mis-shaped \(first: .+\)$", line)


def test_cli_teacher_weights_of_another_architecture_are_one_line(
    digits: Path, saved_teacher, capsys: pytest.CaptureFixture[str]
) -> None:
    path = saved_teacher("resnet10t", 10)  # the teacher is a resnet18
    args = demo_overrides(digits, "algorithms.distillation.enabled=true", f"teacher.checkpoint={path}")
    assert main([DEMO, *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: teacher.checkpoint: {path} does not fit resnet18: "), line


def test_teacher_built_for_another_size_sees_the_batch_resized() -> None:
    same = (0.5,) * 3  # the teacher's normalization is the student's: nothing but the size changes
    teacher = build_teacher("deit_tiny_patch16_224", 10, (same, same), (same, same), img_size=48)
    x = torch.randn(2, 3, 32, 32)
    resized = torch.nn.functional.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(teacher(x), teacher.model(resized), atol=1e-6)
    assert torch.equal(teacher(resized), teacher.model(resized)), "a batch of its own size is not resized"
