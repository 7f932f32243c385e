"""One Composer training step with the full USI algorithm set against a hand-written PyTorch loop
doing the same math on the same batches.

    python benchmarks/framework_overhead.py --student resnet18 --teacher resnet50 --image-size 128 --batch-size 32

Both sides: MixUp/CutMix (timm ``Mixup``), the student's forward, soft-target cross-entropy, the
teacher's forward and ``kd_loss``, backward, AdamW, an EMA update of the weights, channels-last.
Prints one JSON line with ``ratio = composer_ms / plain_ms`` (target: <= 1.10).
"""

from __future__ import annotations

import copy
import statistics
import time

import timm
import torch
from _common import StepTimer, base_parser, report, setup, synthetic_loader
from composer import Trainer
from composer.algorithms import EMA, ChannelsLast
from composer.loss import soft_cross_entropy
from composer.models import ComposerClassifier
from timm.data import Mixup

from usi_composer.algorithms import KnowledgeDistillation, MixUpCutMix, kd_loss
from usi_composer.teacher import build_teacher

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMOOTHING = 0.999


def composer_step_ms(args, teacher: torch.nn.Module) -> float:
    torch.manual_seed(0)
    student = timm.create_model(args.student, num_classes=args.num_classes)
    timer = StepTimer()
    trainer = Trainer(
        model=ComposerClassifier(student, num_classes=args.num_classes),
        train_dataloader=synthetic_loader(args, args.warmup + args.steps),
        optimizers=torch.optim.AdamW(student.parameters(), lr=1e-3),
        max_duration="1ep",
        algorithms=[
            MixUpCutMix(args.num_classes),
            KnowledgeDistillation(teacher),
            EMA(half_life=None, smoothing=SMOOTHING, update_interval="1ba"),
            ChannelsLast(),
        ],
        callbacks=[timer],
        device="gpu" if torch.cuda.is_available() else "cpu",
        progress_bar=False,
    )
    trainer.fit()
    trainer.close()
    return timer.median_ms(args.warmup)


def plain_step_ms(args, teacher: torch.nn.Module) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = timm.create_model(args.student, num_classes=args.num_classes).to(device)
    student = student.to(memory_format=torch.channels_last).train()
    ema = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    mixup = Mixup(
        mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=args.num_classes
    )
    times = []
    for x, y in synthetic_loader(args, args.warmup + args.steps):
        start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        x, y = mixup(x, y)
        logits = student(x)
        ce = soft_cross_entropy(logits, y)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = ce + 5.0 * kd_loss(logits, teacher_logits, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            ema_params = list(ema.parameters()) + list(ema.buffers())
            params = list(student.parameters()) + list(student.buffers())
            for e, p in zip(ema_params, params, strict=True):
                if e.dtype.is_floating_point:
                    e.lerp_(p, 1 - SMOOTHING)
                else:
                    e.copy_(p)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[args.warmup :])


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    teacher = build_teacher(args.teacher, args.num_classes, MEAN, STD, teacher_mean=MEAN, teacher_std=STD)
    if torch.cuda.is_available():
        teacher = teacher.cuda()
    composer_runs, plain_runs = [], []
    for _ in range(args.runs):  # interleaved, so drifts in machine load hit both alike
        plain_runs.append(plain_step_ms(args, teacher))
        composer_runs.append(composer_step_ms(args, teacher))
    composer_ms, plain_ms = statistics.median(composer_runs), statistics.median(plain_runs)
    report("framework_overhead", args, composer_ms=composer_ms, plain_ms=plain_ms, ratio=composer_ms / plain_ms)


if __name__ == "__main__":
    main()
