"""The teacher: input re-normalization, BatchNorm folding, freezing, offline weights."""

import pytest
import timm
import torch
from torch import nn

from usi_composer.errors import SetupError
from usi_composer.teacher import Renormalize, build_teacher, fold_batchnorm

PAIRS = [
    # (student mean, std), (teacher mean, std)
    (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),  # ImageNet -> TResNet
    (((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.481, 0.458, 0.408), (0.269, 0.261, 0.276))),  # Inception -> CLIP
]


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
    teacher = build_teacher("resnet10t", 10, (0.5,) * 3, (0.5,) * 3, checkpoint=str(ckpt))
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SetupError, match=r"pass checkpoint=PATH"):
        build_teacher("resnet10t", 10, (0.5,) * 3, (0.5,) * 3, pretrained=True)


def test_missing_checkpoint_is_a_setup_error(tmp_path) -> None:
    with pytest.raises(SetupError, match="checkpoint not found"):
        build_teacher("resnet10t", 10, (0.5,) * 3, (0.5,) * 3, checkpoint=str(tmp_path / "nope.pt"))
