"""USI's Composer algorithms, usable in any Composer recipe.

They depend on torch, composer and timm only (never on the recipe glue in ``usi_composer``).
``FusedEMA`` is Composer's ``EMA`` with a fused update; channels-last is Composer's own (``ChannelsLast``).
Each algorithm declares the ranges of its hyper-parameters as ``<Algorithm>.ranges`` (name -> ``Range``).
"""

from ._hparams import Range
from .best_of_ema import BestOfEMAAndRaw
from .ema import FusedEMA
from .knowledge_distillation import KnowledgeDistillation, TeacherKey, kd_loss
from .mixup_cutmix import MixUpCutMix, batch_rng, mixup_cutmix_batch

__all__ = [
    "BestOfEMAAndRaw",
    "FusedEMA",
    "KnowledgeDistillation",
    "MixUpCutMix",
    "Range",
    "TeacherKey",
    "batch_rng",
    "kd_loss",
    "mixup_cutmix_batch",
]
