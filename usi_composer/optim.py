"""USI's optimizer and learning-rate schedule."""

from __future__ import annotations

from composer.optim import CosineAnnealingWithWarmupScheduler, LinearScheduler
from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim import Optimizer

__all__ = ["CosineWithWarmupFrom", "build_optimizer"]


def build_optimizer(
    module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> Optimizer:
    """AdamW without weight decay on biases and norm parameters (timm's parameter groups,
    which also honour a backbone's ``no_weight_decay()``, e.g. ViT position embeddings)."""
    return create_optimizer_v2(
        module,
        opt="adamw",
        lr=lr,
        weight_decay=weight_decay,
        betas=tuple(betas),
        eps=eps,
        filter_bias_and_bn=True,
    )


class CosineWithWarmupFrom(CosineAnnealingWithWarmupScheduler):
    """Composer's cosine-with-warm-up, with the warm-up starting at ``alpha_i`` instead of 0.

    USI (timm's ``warmup_lr``) warms up linearly from 1e-4 to the peak learning rate; Composer's
    scheduler always starts the warm-up at 0. Multipliers are relative to the optimizer's lr.
    """

    def __init__(self, t_warmup: str, alpha_i: float, alpha_f: float, t_max: str = "1dur") -> None:
        super().__init__(t_warmup=t_warmup, t_max=t_max, alpha_f=alpha_f)
        self.alpha_i = alpha_i
        self.warmup_scheduler = LinearScheduler(alpha_i=alpha_i, alpha_f=1.0, t_max=t_warmup)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(t_warmup={self.t_warmup!r}, alpha_i={self.alpha_i}, "
            f"alpha_f={self.alpha_f}, t_max={self.t_max!r})"
        )
