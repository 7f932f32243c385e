"""The teacher: input re-normalization, BatchNorm folding, freezing, offline weights."""

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from usi_composer.errors import SetupError, UnreachableError
from usi_composer.teacher import Renormalize, build_teacher, fold_batchnorm

PAIRS = [
    # (student mean, std), (teacher mean, std)
    (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),  # ImageNet -> TResNet
    (((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))),  # Inception -> CLIP
]

HALF = ((0.5,) * 3, (0.5,) * 3)  # a student's normalization
IMAGENET = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)  # resnet10t's pretrained cfg


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_renormalize_is_exact(student, teacher) -> None:
    (mean_s, std_s), (mean_t, std_t) = student, teacher
    raw = torch.rand(4, 3, 8, 8, dtype=torch.float64)  # images in [0, 1]

    def norm(x, mean, std):
        return (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(
            1, 3, 1, 1
        )

    renorm = Renormalize(nn.Identity(), mean_s, std_s, mean_t, std_t)
    got = renorm(norm(raw, mean_s, std_s))
    torch.testing.assert_close(got, norm(raw, mean_t, std_t), rtol=0, atol=1e-12)


def test_renormalize_identity_when_equal() -> None:
    renorm = Renormalize(nn.Identity(), (0.5,) * 3, (0.25,) * 3, (0.5,) * 3, (0.25,) * 3)
    x = torch.randn(2, 3, 4, 4)
    assert renorm.identity and torch.equal(renorm(x), x)


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_fold_batchnorm_is_exact_and_removes_bn(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original is left untouched"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_build_teacher_is_frozen_and_matches_timm(saved_teacher) -> None:
    ckpt = saved_teacher("resnet10t", 10)
    teacher = build_teacher("resnet10t", 10, HALF, IMAGENET, checkpoint=str(ckpt))
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    plain = timm.create_model("resnet10t", num_classes=10)
    plain.load_state_dict(torch.load(ckpt))
    plain.eval()
    raw = torch.rand(2, 3, 32, 32)
    cfg = plain.pretrained_cfg
    x_teacher = (raw - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(teacher((raw - 0.5) / 0.5), plain(x_teacher), rtol=1e-4, atol=1e-4)


def test_pretrained_offline_names_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE when it is imported (it may be already): set both, or the
    # download is tried and times out on a machine without network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        SetupError, match=r"HF_HUB_OFFLINE is set.*pass teacher\.checkpoint=PATH teacher\.pretrained=false"
    ):
        build_teacher("resnet10t", 10, HALF, IMAGENET, pretrained=True)


def test_pretrained_weights_from_a_hub_that_does_not_answer_fail_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: one attempt to reach the hub (refused here at once; 3 s at most), not huggingface_hub's retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent")  # nothing cached
    with pytest.raises(UnreachableError) as error:
        build_teacher("resnet10t", 10, HALF, IMAGENET, pretrained=True)
    message = str(error.value)
    assert message.startswith("timm's pretrained weights for 'resnet10t' are on 127.0.0.1, which does not answer")
    assert "pass teacher.checkpoint=PATH teacher.pretrained=false" in message and error.value.retryable


def test_missing_checkpoint_is_a_setup_error(tmp_path) -> None:
    with pytest.raises(SetupError, match="checkpoint not found"):
        build_teacher("resnet10t", 10, HALF, IMAGENET, checkpoint=str(tmp_path / "nope.pt"))


def pretrained_teacher(digits, file, *extra: str) -> list[str]:
    """The demo recipe distilling from test_resnet with timm's pretrained loading of ``file``
    (``pretrained_cfg_overlay.file``: timm loads a local file as it would the hub's weights)."""
    from helpers import CHECKPOINTED, tiny_run

    return tiny_run(
        digits,
        "algorithms.distillation.enabled=true",
        "teacher.name=test_resnet",
        "teacher.checkpoint=null",
        "teacher.pretrained=true",
        f"teacher.kwargs.pretrained_cfg_overlay.file={file}",
        *extra,
        **CHECKPOINTED,
    )


def test_pretrained_teacher_for_other_classes_stops_before_anything_is_built(digits, saved_teacher, capsys) -> None:
    from helpers import DEMO, one_error_line
    from usi_composer.cli.train import main

    in1k = saved_teacher("test_resnet", 1000)
    # What timm does with it: the trunk's weights, and a new, random 10-class head without a word
    built = timm.create_model(
        "test_resnet", pretrained=True, num_classes=10, pretrained_cfg_overlay={"file": str(in1k)}
    )
    weights = torch.load(in1k, weights_only=True)
    assert torch.equal(built.conv1[0].weight, weights["conv1.0.weight"]) and built.fc.weight.shape[0] == 10

    assert main([DEMO, *pretrained_teacher(digits, in1k)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: teacher.kwargs.pretrained_cfg_overlay.file: the pretrained weights of teacher test_resnet classify "
        "1000 classes, data.num_classes is 10: timm would give the teacher a new, untrained classifier, which knows "
        "nothing of these classes; fine-tune a teacher on this data as yamls/demo_teacher.yaml does, then set "
        "teacher.checkpoint=PATH and teacher.pretrained=false (or, for a subset of its classes, teacher.class_map)"
    )


def test_a_1000_class_teacher_distils_a_subset_of_imagenet_through_its_class_map(
    image_folders, saved_teacher, tmp_path
) -> None:
    """``teacher.class_map=imagenet``: the data's classes are ImageNet-1k wnids; the teacher's logits for them, in
    the data's order, are what KD sees (softmax over the subset). A file of indices does the same."""
    from timm.data import ImageNetInfo

    from helpers import DEMO
    from usi_composer.algorithms import KnowledgeDistillation
    from usi_composer.config import ConfigError, load_config
    from usi_composer.data.layout import find_classes
    from usi_composer.plan import resolve
    from usi_composer.training import train

    root = image_folders(4)
    wnids = find_classes(str(root / "train"))
    expected = tuple(ImageNetInfo().label_names().index(w) for w in wnids)
    in1k = saved_teacher("test_resnet", 1000)
    run = [
        "data.local=null",
        f"data.train_dir={root / 'train'}",
        "data.val_dir=null",
        "data.num_classes=4",
        "data.num_workers=0",
        "trainer.global_batch_size=4",
        "trainer.max_duration=1ba",
        "trainer.progress_bar=false",
        "teacher.name=test_resnet",
        f"teacher.checkpoint={in1k}",
        "teacher.evaluate_first=false",
    ]
    cfg = load_config(DEMO, [*run, "teacher.class_map=imagenet"])
    assert resolve(cfg).teacher_outputs == expected and resolve(cfg).teacher_classes == 1000
    trainer = train(cfg)
    teacher = next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation)).teacher
    x = torch.randn(2, 3, 32, 32)
    assert teacher.identity, "the demo's teacher sees the student's normalization"
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher.model(x)[:, list(expected)])
    trainer.close()
    indices = tmp_path / "map.txt"
    indices.write_text("\n".join(map(str, expected)))
    assert resolve(load_config(DEMO, [*run, f"teacher.class_map={indices}"])).teacher_outputs == expected
    with pytest.raises(ConfigError, match=r"teacher\.class_map: maps 3 classes to outputs .* needs data\.num_classes"):
        indices.write_text("1\n2\n3")
        resolve(load_config(DEMO, [*run, f"teacher.class_map={indices}"]))


def test_pretrained_teacher_key_names_where_the_class_count_comes_from(digits) -> None:
    from helpers import DEMO
    from usi_composer.config import ConfigError, load_config
    from usi_composer.plan import resolve
    from usi_composer.preflight import check_teacher_classes

    def check(*overrides: str) -> None:
        cfg = load_config(DEMO, list(overrides))
        check_teacher_classes(cfg, resolve(cfg))

    def key(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            check(*overrides)
        return error.value.key

    hub = ["teacher.name=tresnet_v2_l.miil_in21k_ft_in1k", "teacher.checkpoint=null", "teacher.pretrained=true"]
    assert key(*hub) == "teacher.pretrained"  # the hub's weights: 1000 classes, the data 10
    assert key(*hub, "teacher.kwargs.pretrained_cfg_overlay.num_classes=100") == (
        "teacher.kwargs.pretrained_cfg_overlay.num_classes"
    )
    check(*hub, "data.num_classes=1000")  # the weights' classes: fine
    check(*hub, "algorithms.distillation.enabled=false")  # no teacher


def test_pretrained_teacher_for_the_same_classes_distils(digits, saved_teacher) -> None:
    from helpers import DEMO
    from usi_composer.algorithms import KnowledgeDistillation
    from usi_composer.builders import build_model
    from usi_composer.config import load_config
    from usi_composer.training import train

    ten = saved_teacher("test_resnet", 10)
    overrides = pretrained_teacher(digits, ten, "teacher.kwargs.pretrained_cfg_overlay.num_classes=10")
    trainer = train(load_config(DEMO, overrides))
    kd = next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))
    assert torch.equal(kd.teacher.model.get_submodule("fc").weight, torch.load(ten, weights_only=True)["fc.weight"])
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()
    # A student may start from weights of another class count: ordinary fine-tuning, not refused
    in1k = saved_teacher("test_resnet", 1000)
    student = ["model.pretrained=true", f"model.kwargs.pretrained_cfg_overlay.file={in1k}"]
    assert build_model(load_config(DEMO, [*overrides, *student])).module.fc.weight.shape[0] == 10
