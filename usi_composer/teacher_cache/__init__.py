"""A cache of the teacher's outputs, keyed by the exact view: the online teacher, computed once.

Since the input pipeline's draws are keyed (``data/draws.py``: a sample's view is a function of
(seed, epoch, sample index); ``algorithms/mixup_cutmix.py``: a microbatch's mixing of (seed, batch,
rank, microbatch)), two runs with the same data, seed, batch layout, image size and augmentation
feed the teacher bit-identical microbatches. Only the student and the KD hyper-parameters differ
between the points of a temperature, alpha, KD-only or backbone sweep; this module stores the
teacher's logits of one run and serves them to the others, so the teacher runs once per sweep.

Layout of a cache at ``URI`` (a local folder or any object store Composer's
``maybe_create_object_store_from_uri`` takes):

- ``cache.json``: the format, the layout (batches per epoch, microbatches, world size) and the
  fingerprint (``fingerprint.py``) of everything that shapes the teacher's inputs and outputs;
- ``rank{r}/ep{e}/ba{b}.safetensors``: the outputs of rank ``r``'s microbatches of global batch
  ``b`` (epoch ``e``), tensors named ``<part>.<microbatch>`` (``format.encode``), with the checksum
  of its tensors, verified before they reach a step (``format.read_batch``);
- ``rank{r}/written.json``: the batches whose outputs are stored (written at epoch ends, at the
  run's checkpoints and at the end), so a reader knows how long a run the cache serves.

``algorithms.distillation.cache_write: URI`` (or ``usi-cache-teacher``, which trains no student)
writes it; ``algorithms.distillation.cache: URI`` reads it instead of building and running the
teacher. Both plug into ``KnowledgeDistillation``'s generic seam (``teacher_outputs`` /
``on_teacher_outputs``); see ``algorithms/README.md`` for when a cache is exact.

The package: ``format.py`` (encodings, layout, manifest, batch files and checksums), ``store.py``
(where it lives), ``fingerprint.py`` (what it must match), ``reader.py``, ``writer.py``, and
``opening.py`` (a run's reader or writer, after the checks that can refuse it).
"""

from usi_composer.teacher_cache.fingerprint import fingerprint, first_difference, sweep_group
from usi_composer.teacher_cache.format import CacheManifest, CorruptCacheError, decode, encode
from usi_composer.teacher_cache.opening import cache_covers, open_teacher_cache, read_manifest
from usi_composer.teacher_cache.reader import TeacherCacheReader
from usi_composer.teacher_cache.store import CacheStore
from usi_composer.teacher_cache.writer import TeacherCacheWriter

__all__ = [
    "CacheManifest",
    "CacheStore",
    "CorruptCacheError",
    "TeacherCacheReader",
    "TeacherCacheWriter",
    "cache_covers",
    "decode",
    "encode",
    "fingerprint",
    "first_difference",
    "open_teacher_cache",
    "read_manifest",
    "sweep_group",
]
