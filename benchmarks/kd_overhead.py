"""What KnowledgeDistillation costs beyond the teacher's forward pass.

    python benchmarks/kd_overhead.py --student resnet18 --teacher resnet50 --image-size 128 --batch-size 32

Times, per training step in a Composer Trainer (median after warm-up, data in memory):
(a) the student alone, (b) the teacher's forward alone (prepared as ours is), (c) the student
with ``KnowledgeDistillation``. Prints one JSON line with ``overhead_ratio = c / (a + b)``
(target: <= 1.05).
"""

from __future__ import annotations

import statistics

import timm
import torch
from _common import StepTimer, base_parser, median_ms, report, setup, synthetic_loader
from composer import Trainer
from composer.models import ComposerClassifier
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from usi_composer.algorithms import KnowledgeDistillation
from usi_composer.teacher import build_teacher

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def step_ms(args, teacher: torch.nn.Module | None) -> float:
    torch.manual_seed(0)
    student = timm.create_model(args.student, num_classes=args.num_classes)
    timer = StepTimer()
    algorithms = [KnowledgeDistillation(teacher)] if teacher is not None else []
    trainer = Trainer(
        model=ComposerClassifier(student, num_classes=args.num_classes),
        train_dataloader=synthetic_loader(args, args.warmup + args.steps),
        optimizers=torch.optim.AdamW(student.parameters(), lr=1e-3),
        max_duration="1ep",
        algorithms=algorithms,
        callbacks=[timer],
        device="cpu" if not torch.cuda.is_available() else "gpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    return timer.median_ms(args.warmup)


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    teacher = build_teacher(args.teacher, args.num_classes, (MEAN, STD), (MEAN, STD))
    x = next(iter(synthetic_loader(args, 1)))[0]
    if torch.cuda.is_available():
        teacher, x = teacher.cuda(), x.cuda()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(x)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    a_runs, b_runs, c_runs = [], [], []
    for _ in range(args.runs):  # interleaved, so drifts in machine load hit all three alike
        a_runs.append(step_ms(args, None))
        b_runs.append(median_ms(teacher_forward, args.steps, args.warmup))
        c_runs.append(step_ms(args, teacher))
    a, b, c = (statistics.median(r) for r in (a_runs, b_runs, c_runs))
    report("kd_overhead", args, student_step_ms=a, teacher_forward_ms=b, kd_step_ms=c, overhead_ratio=c / (a + b))


if __name__ == "__main__":
    main()
