"""The USI teacher: a timm model by name, frozen, BN-folded, re-normalized to the student's inputs."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import Callback, State
from composer.loggers import Logger
from torch import nn

from usi_composer.errors import first_line
from usi_composer.models import create_backbone

__all__ = ["Renormalize", "TeacherEvaluation", "build_teacher", "fold_batchnorm"]

log = logging.getLogger(__name__)


class Renormalize(nn.Module):
    """Feeds ``model`` the student's normalized batch, re-normalized to the model's own mean/std.

    ``x_t = (x_s * std_s + mean_s - mean_t) / std_t``, folded into one multiply-add. (The
    official USI code forgets to divide the mean shift by ``std_t``; this does not.)
    ``input_size``: where set and the batch has another size, the batch is resized to it
    (bicubic, antialiased, as timm's eval transform), for a teacher built for another size.
    ``outputs``: the model's outputs that are the data's classes (softmax is then over those alone).
    """

    def __init__(
        self,
        model: nn.Module,
        student_mean: Sequence[float],
        student_std: Sequence[float],
        teacher_mean: Sequence[float],
        teacher_std: Sequence[float],
        channels_last: bool = False,
        input_size: int | None = None,
        outputs: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.input_size = input_size
        # float64 buffers (cast to the input dtype on use) keep the fold exact up to rounding.
        mean_s, std_s, mean_t, std_t = (
            torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
            for v in (student_mean, student_std, teacher_mean, teacher_std)
        )
        self.identity = bool(torch.equal(mean_s, mean_t) and torch.equal(std_s, std_t))
        self.register_buffer("scale", std_s / std_t, persistent=False)
        self.register_buffer("shift", (mean_s - mean_t) / std_t, persistent=False)
        # ``outputs``: the model's logits that are the data's classes, in the data's order (teacher.class_map)
        picked = torch.tensor(list(outputs), dtype=torch.long) if outputs is not None else None
        self.register_buffer("outputs", picked, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.identity:
            x = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        return logits if self.outputs is None else logits.index_select(-1, self.outputs)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm into the convolution before it, where that is exact.

    Exact means the model is in eval mode (running statistics) and the convolution's output
    feeds the BatchNorm alone. Handles timm's ``BatchNormAct2d`` (BN + activation in one
    module, used by most timm CNNs, TResNet included), which ``torch.fx``'s own ``fuse`` does
    not: its activation stays, as a module after the folded convolution. A model that
    ``torch.fx`` cannot trace (e.g. attention with data-dependent flags) is returned unchanged,
    with a warning: that costs speed, never correctness.
    """
    from timm.layers import BatchNormAct2d
    from torch.fx import GraphModule, Tracer
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class _Tracer(Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, BatchNormAct2d) or super().is_leaf_module(m, qualname)

    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model.eval()  # nothing to fold (transformers, MLP-only nets)
    model = copy.deepcopy(model).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception as e:  # torch.fx raises many error types on untraceable code
        log.warning(
            "teacher: BatchNorm not folded (%s cannot be traced by torch.fx: %s)",
            type(model).__name__,
            first_line(e, 200),
        )
        return model
    modules = dict(model.named_modules())
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if (
            not isinstance(conv_node, torch.fx.Node)
            or conv_node.op != "call_module"
            or type(modules[conv_node.target]) is not nn.Conv2d
            or len(conv_node.users) != 1
        ):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        _set_submodule(model, conv_node.target, fuse_conv_bn_eval(modules[conv_node.target], bn))
        if isinstance(bn, BatchNormAct2d):  # keep what follows the normalization
            _set_submodule(model, node.target, nn.Sequential(bn.drop, bn.act))
        else:
            node.replace_all_uses_with(conv_node)
            graph.erase_node(node)
        folded += 1
    log.info("teacher: folded %d BatchNorm layers into convolutions", folded)
    return GraphModule(model, graph, class_name=type(model).__name__) if folded else model


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def build_teacher(
    name: str,
    num_classes: int,
    student: tuple[Sequence[float], Sequence[float]],
    teacher: tuple[Sequence[float], Sequence[float]],
    checkpoint: str | None = None,
    pretrained: bool = False,
    fold_bn: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    img_size: int | None = None,
    trust_checkpoint: bool = False,
    outputs: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A ready teacher for ``KnowledgeDistillation``: eval mode, no gradients, BN folded,
    channels-last, taking the student's normalized inputs.

    ``img_size``: the size the teacher is built for (timm's ``img_size`` where the model takes
    it) and sees: a student batch of another size is resized to it. None: the batch's size.

    ``student``: the (mean, std) its inputs are normalized with; ``teacher``: the (mean, std) it was
    trained with (``plan.py`` resolves both: ``teacher.mean``/``std``, else its timm ``pretrained_cfg``).
    ``compile``: ``torch.compile`` the prepared teacher in place (``nn.Module.compile``: it stays
    this module, and compiles at its first call).
    ``trust_checkpoint``: unpickle ``checkpoint`` in full (it may run code); else it is read as data.
    ``outputs``: which of its ``num_classes`` outputs are the data's classes (``teacher.class_map``).
    """
    model = create_backbone(
        name,
        num_classes,
        checkpoint=checkpoint,
        pretrained=pretrained,
        img_size=img_size,
        trust_checkpoint=trust_checkpoint,
        section="teacher",
        **kwargs,
    )
    model = model.eval().requires_grad_(False)
    if fold_bn:
        model = fold_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    prepared = Renormalize(model, *student, *teacher, channels_last, img_size, outputs).eval().requires_grad_(False)
    if compile:
        prepared.compile()
    return prepared


class TeacherEvaluation(Callback):
    """``teacher.evaluate_first``: the teacher's top-1 on the validation split, once, before step 1.

    A sanity check worth its one pass over the split: a teacher with the wrong weights, classes or
    normalization distils noise without a word; its own score says so before the first step. The
    evaluation runs as the student's does (the eval loader, its device transform, the run's precision),
    through the prepared teacher ``KnowledgeDistillation`` holds; logged as ``metrics/teacher/top1`` and
    said in one line.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def fit_start(self, state: State, logger: Logger) -> None:
        from composer.core.precision import get_precision_context
        from composer.utils import dist

        from usi_composer.algorithms import KnowledgeDistillation

        kd = next((a for a in state.algorithms if isinstance(a, KnowledgeDistillation)), None)
        if kd is None or kd.teacher is None or not state.evaluators:
            return
        spec = state.evaluators[0].dataloader
        counts = state.device.tensor_to_device(torch.zeros(2, dtype=torch.float64))  # correct, seen
        with torch.no_grad():
            for batch in spec.dataloader:
                inputs, targets = spec.microbatch_transforms(state.device.batch_to_device(spec.batch_transforms(batch)))
                with get_precision_context(state.precision, state.precision_config):
                    predicted = kd.teacher(inputs).argmax(dim=-1)
                counts += torch.stack([(predicted == targets).sum().double(), counts.new_tensor(targets.numel())])
        dist.all_reduce(counts)
        correct, seen = counts.tolist()  # one read, once per run
        top1 = correct / max(seen, 1)
        logger.log_metrics({"metrics/teacher/top1": top1})
        log.info(
            "teacher %s: top-1 %.2f%% on the validation split (%d images), before step 1", self.name, 100 * top1, seen
        )
