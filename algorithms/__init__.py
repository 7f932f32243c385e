"""USI's Composer algorithms, usable in any Composer recipe.

They depend on torch, composer and timm only (never on the recipe glue in ``usi_composer``).
EMA and channels-last are Composer's own (``composer.algorithms.EMA``, ``ChannelsLast``).
"""

from .best_of_ema import BestOfEMAAndRaw
from .knowledge_distillation import KnowledgeDistillation, kd_loss
from .mixup_cutmix import MixUpCutMix, mixup_cutmix_batch

__all__ = ["BestOfEMAAndRaw", "KnowledgeDistillation", "MixUpCutMix", "kd_loss", "mixup_cutmix_batch"]
