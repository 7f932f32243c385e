"""Our prepared teacher (BN folded, channels-last, no-grad) against the same timm model in plain eval().

    python benchmarks/teacher_forward.py --teacher resnet50 --image-size 128 --batch-size 32

Prints one JSON line; ``ratio = ours_ms / plain_ms`` (target: <= 1.0).
"""

from __future__ import annotations

import statistics

import timm
import torch
from _common import base_parser, median_ms, report, setup
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from usi_composer.teacher import build_teacher


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", action="store_true", help="prepare ours without channels-last")
    args = parser.parse_args()
    setup(args)
    device = torch.device(args.device)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    plain = timm.create_model(args.teacher, num_classes=args.num_classes).eval().to(device)
    ours = build_teacher(
        args.teacher,
        args.num_classes,
        (mean, std),
        (mean, std),
        channels_last=not args.no_channels_last,
    ).to(device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(model: torch.nn.Module):
        def run() -> None:
            with torch.no_grad():
                model(x)
            sync()

        return run

    ours_runs, plain_runs = [], []
    for _ in range(args.runs):  # interleaved, so drifts in machine load hit both alike
        plain_runs.append(median_ms(forward(plain), args.steps, args.warmup))
        ours_runs.append(median_ms(forward(ours), args.steps, args.warmup))
    ours_ms, plain_ms = statistics.median(ours_runs), statistics.median(plain_runs)
    report(
        "teacher_forward", args, device_name=str(device), ours_ms=ours_ms, plain_ms=plain_ms, ratio=ours_ms / plain_ms
    )


if __name__ == "__main__":
    main()
