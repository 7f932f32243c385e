"""The teacher-outputs cache: formats, the KnowledgeDistillation seam, the fingerprint's refusals (one
line, exit 2) and a cached run ending bit-identical to the online-teacher run (MDS and folders, 2
loader workers, a mid-epoch resume)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerClassifier
from resumption import differences
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import DEMO_CPU, NUM_CLASSES, REPO, USI_CPU, MotoServer, one_error_line, run, tiny_run
from usi_composer.algorithms import KnowledgeDistillation, MixUpCutMix, kd_loss
from usi_composer.checkpoints import first_math_change
from usi_composer.cli import cache_teacher
from usi_composer.cli import train as train_cli
from usi_composer.config import ConfigError, config_to_dict, load_config
from usi_composer.teacher_cache import CacheStore, decode, encode, first_difference

DEMO = "yamls/demo.yaml"


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_format_gives_back_every_logit_bit_for_bit(dtype: torch.dtype) -> None:
    logits = (torch.randn(6, 11, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    parts = encode(logits, "full")
    assert parts["logits"].dtype == dtype
    assert torch.equal(decode(parts, "full", 11), logits)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_keeps_the_top_probabilities_and_the_rest_of_the_mass(k: int) -> None:
    num_classes = 20
    logits = torch.randn(16, num_classes, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 3
    parts = encode(logits, "topk", k)
    assert parts["values"].shape == parts["indices"].shape == (16, k) and parts["indices"].dtype == torch.int16
    rebuilt = decode(parts, "topk", num_classes).double()
    p, q = logits.softmax(-1), rebuilt.softmax(-1)
    top = logits.topk(k, dim=-1).indices
    # exact top-k probabilities at T = 1 (fp32 rounding), the tail's total mass, and a uniform tail
    torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), rtol=1e-5, atol=1e-7)
    mask = torch.ones_like(p, dtype=torch.bool).scatter_(-1, top, False)
    torch.testing.assert_close((q * mask).sum(-1), (p * mask).sum(-1), rtol=1e-5, atol=1e-7)
    tail = q.masked_select(mask).view(16, num_classes - k)
    torch.testing.assert_close(tail, tail[:, :1].expand_as(tail))


def test_topk_tail_stays_finite_when_the_top_k_hold_all_the_mass() -> None:
    logits = torch.full((4, 10), -1e4)
    logits[:, 0] = 1e4  # in fp32 the other classes' probability is exactly 0
    rebuilt = decode(encode(logits, "topk", 2), "topk", 10)
    assert torch.isfinite(rebuilt).all()
    student = torch.randn(4, 10, requires_grad=True)
    loss = kd_loss(student, rebuilt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_first_difference_follows_the_stored_order_and_skips_what_is_unknown() -> None:
    stored = {"data": "a", "trainer.seed": 0, "teacher weights": "sha256:x", "data.image_size": 32}
    assert first_difference(stored, dict(stored)) is None
    changed = {**stored, "trainer.seed": 1, "data.image_size": 64}
    assert first_difference(stored, changed) == ("trainer.seed", 0, 1)
    unknown = {**stored, "teacher weights": None}
    assert first_difference(stored, unknown) == ("teacher weights", "sha256:x", None)
    assert first_difference(stored, unknown, skip=["teacher weights"]) is None
    assert first_difference(stored, {k: v for k, v in stored.items() if k != "data"}) == ("data", "a", "unset")


# --------------------------------------------------------------------------- the seam in KnowledgeDistillation


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _fit(kd: KnowledgeDistillation) -> nn.Module:
    """Two epochs of 3 batches of 4, in microbatches of 2, MixUp/CutMix on: the student's weights."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g))
    model = ComposerClassifier(_net(0), num_classes=4)
    Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
        max_duration="2ep",
        algorithms=[MixUpCutMix(4), kd],
        device_train_microbatch_size=2,
        device="cpu",
        progress_bar=False,
        seed=3,
    ).fit()
    return model


def test_teacher_outputs_keyed_by_microbatch_train_as_the_teacher_does() -> None:
    seen: dict[tuple[int, int, int, int], torch.Tensor] = {}
    online = _fit(KnowledgeDistillation(_net(1), on_teacher_outputs=lambda key, logits: seen.setdefault(key, logits)))
    assert list(seen) == [(e, b, 0, m) for b in range(6) for e in [b // 3] for m in range(2)]
    served: list[tuple[int, int, int, int]] = []
    cached = _fit(KnowledgeDistillation(teacher_outputs=lambda key: served.append(key) or seen[key]))
    assert served == list(seen)
    for (name, a), b in zip(online.state_dict().items(), cached.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # the outputs matter: other logits for one microbatch train another model
    seen[(0, 0, 0, 1)] = seen[(0, 0, 0, 1)] * 2.0  # (a shift would not do: softmax ignores it)
    other = _fit(KnowledgeDistillation(teacher_outputs=seen.__getitem__))
    assert not torch.equal(other.module[0].weight, online.module[0].weight)


def test_knowledge_distillation_needs_one_source_of_teacher_outputs() -> None:
    with pytest.raises(ValueError, match="exactly one of teacher and teacher_outputs"):
        KnowledgeDistillation()
    with pytest.raises(ValueError, match="exactly one of teacher and teacher_outputs"):
        KnowledgeDistillation(_net(1), teacher_outputs=lambda key: torch.zeros(1))
    with pytest.raises(ValueError, match="on_teacher_outputs needs a teacher"):
        KnowledgeDistillation(teacher_outputs=lambda key: torch.zeros(1), on_teacher_outputs=print)
    kd = KnowledgeDistillation(teacher_outputs=lambda key: torch.zeros(1))
    assert repr(kd).startswith("KnowledgeDistillation(teacher=teacher, alpha=5.0")  # the checkpoint's repr


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["algorithms.distillation.cache=/a", "algorithms.distillation.cache_write=/b"],
            "algorithms.distillation.cache_write: a run reads a teacher cache (cache) or writes one",
        ),
        (
            ["algorithms.distillation.enabled=false", "algorithms.distillation.cache=/a"],
            "algorithms.distillation.cache: a teacher cache needs distillation",
        ),
        (["algorithms.distillation.cache_format=topk"], "algorithms.distillation.cache_topk: cache_format=topk needs"),
        (
            ["algorithms.distillation.cache_format=topk", "algorithms.distillation.cache_topk=10"],
            "algorithms.distillation.cache_topk: must be below data.num_classes (10), got 10",
        ),
        (["algorithms.distillation.cache_topk=3"], "algorithms.distillation.cache_topk: is for cache_format=topk"),
        (["algorithms.distillation.cache_topk=0"], "algorithms.distillation.cache_topk: must be >= 1, got 0"),
        (["algorithms.distillation.cache_format=top5"], "algorithms.distillation.cache_format: must be full or topk"),
    ],
)
def test_cache_keys_are_checked_in_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_reading_a_cache_needs_no_teacher_weights_but_writing_one_does() -> None:
    cfg = load_config(DEMO, ["teacher.checkpoint=null", "algorithms.distillation.cache=/a"])
    assert cfg.teacher.checkpoint is None
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint: a teacher needs trained weights"):
        load_config(DEMO, ["teacher.checkpoint=null", "algorithms.distillation.cache_write=/a"])


def test_where_the_cache_is_is_free_its_format_is_training_math() -> None:
    """Reading an exact cache is the online teacher (its fingerprint is checked): ``cache`` and ``cache_write``
    are free. A top-k cache is another teacher signal: ``cache_format``/``cache_topk`` are training math, so an
    online run resumed with a top-k cache is refused (the reader needs the config to say its format)."""
    base = config_to_dict(load_config(DEMO))
    for key, value in [("cache", "/a"), ("cache_write", "s3://b/c")]:
        changed = config_to_dict(load_config(DEMO))
        changed["algorithms"]["distillation"][key] = value
        assert first_math_change(base, changed) is None, key
    topk = config_to_dict(load_config(DEMO))
    topk["algorithms"]["distillation"].update(cache="/a", cache_format="topk", cache_topk=5)
    assert first_math_change(base, topk) == ("algorithms.distillation.cache_format", "full", "topk")
    accepted = ["algorithms.distillation.cache_format", "algorithms.distillation.cache_topk"]
    assert first_math_change(base, topk, accept=accepted) is None
    changed["algorithms"]["distillation"]["alpha"] = 1.0
    assert first_math_change(base, changed) == ("algorithms.distillation.alpha", 5.0, 1.0)


# --------------------------------------------------------------------------- storage


def test_local_store_replaces_objects_whole(tmp_path: Path) -> None:
    store = CacheStore(str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):
        store.read("rank0/ep0/ba0.safetensors")
    assert store.read_json("cache.json") is None
    store.write("rank0/ep0/ba0.safetensors", b"first")
    store.write("rank0/ep0/ba0.safetensors", b"second")
    assert store.read("rank0/ep0/ba0.safetensors") == b"second"
    assert [p.name for p in (tmp_path / "cache" / "rank0" / "ep0").iterdir()] == ["ba0.safetensors"]  # no leftovers


@pytest.mark.slow
def test_a_cache_round_trips_through_an_object_store(tmp_path: Path) -> None:
    """Write a cache's objects to S3 (moto's server) and read them back as a training run would."""
    from usi_composer.teacher_cache import CacheManifest, TeacherCacheReader, TeacherCacheWriter

    with MotoServer().serving() as s3:
        s3.client().create_bucket(Bucket="caches")
        store = CacheStore("s3://caches/demo/run1")
        manifest = CacheManifest("topk", 2, 5, 2, 2, 1, {"trainer.seed": 0})
        writer = TeacherCacheWriter(store, manifest, rank=0)
        logits = {(b // 2, b, 0, m): torch.randn(3, 5) for b in range(3) for m in range(2)}
        for key, value in logits.items():
            writer(key, value)
        writer.flush()
        assert store.read_json("rank0/written.json") == {"batches": [[0, 3]]}

        class _State:
            device = type("CPU", (), {"name": "cpu", "tensor_to_device": staticmethod(lambda t: t)})()

        reader = TeacherCacheReader(store, manifest, total_batches=3)
        reader.init(_State(), None)  # type: ignore[arg-type]
        for key, value in logits.items():
            torch.testing.assert_close(reader(key), decode(encode(value, "topk", 2), "topk", 5))
        reader._stop()


# --------------------------------------------------------------------------- refusals, one line and exit 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path, saved_teacher) -> dict:
    """The tiny run's overrides and data, its teacher's weights, and a full cache of 2 batches written
    by usi-cache-teacher."""
    teacher = saved_teacher("resnet10t", NUM_CLASSES)
    args = [*tiny_run(tiny_folder, teacher_weights=teacher, **DEMO_CPU), "model.name=resnet10t", "data.val_dir=null"]
    cache = tmp_path_factory.mktemp("cache") / "cache"
    assert cache_teacher.main([DEMO, *args, "--out", str(cache)]) == 0
    return {"data": tiny_folder, "args": args, "cache": cache, "teacher": teacher}


def _train_rc(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = train_cli.main([DEMO, *args])
    return rc, capsys.readouterr().err.strip()


def test_usi_cache_teacher_writes_every_batch_and_reports_its_size(tiny: dict) -> None:
    cache = tiny["cache"]
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.safetensors")) == [
        "rank0/ep0/ba0.safetensors",
        "rank0/ep0/ba1.safetensors",
    ]
    store = CacheStore(str(cache))
    assert store.read_json("rank0/written.json") == {"batches": [[0, 2]]}
    manifest = store.read_json("cache.json")
    assert (manifest["format"], manifest["batches_per_epoch"], manifest["microbatches"]) == ("full", 2, 1)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.seed=5", "trainer.seed = 0, this run has 5"),
        ("data.image_size=24", "data.image_size = 16, this run has 24"),
        ("algorithms.mixup_cutmix.prob=0.5", "algorithms.mixup_cutmix.prob = 1.0, this run has 0.5"),
        ("data.mean=[0.4,0.4,0.4]", "plan.student_mean = [0.5, 0.5, 0.5], this run has [0.4"),
        ("teacher.fold_bn=false", "teacher.fold_bn = true, this run has false"),
        ("trainer.microbatch_size=4", "plan.microbatch_size = 8, this run has 4"),
    ],
)
def test_a_run_whose_teacher_inputs_differ_stops_naming_the_first_difference(
    tiny: dict, capsys: pytest.CaptureFixture, override: str, named: str
) -> None:
    rc, err = _train_rc(capsys, *tiny["args"], f"algorithms.distillation.cache={tiny['cache']}", override)
    assert rc == 2, err
    assert err.splitlines() == [err] and err.startswith("error: algorithms.distillation.cache: the teacher cache at")
    assert named in err


def test_other_teacher_weights_are_refused(tiny: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    weights = torch.load(tiny["teacher"], weights_only=True)
    weights["fc.bias"] = weights["fc.bias"] + 1
    torch.save(weights, other)
    cache = f"algorithms.distillation.cache={tiny['cache']}"
    rc, err = _train_rc(capsys, *tiny["args"], cache, f"teacher.checkpoint={other}")
    assert rc == 2 and err.splitlines() == [err] and "teacher weights = sha256:" in err


def test_a_run_longer_than_the_cache_stops_at_start_up(tiny: dict, capsys: pytest.CaptureFixture) -> None:
    rc, err = _train_rc(
        capsys, *tiny["args"], f"algorithms.distillation.cache={tiny['cache']}", "trainer.max_duration=2ep"
    )
    assert rc == 2 and err.splitlines() == [err], err
    assert err.startswith("error: trainer.max_duration: is 2ep: 4 batches (2 epochs), the teacher cache at")
    assert "holds 2 batches (1 epochs)" in err


def test_no_cache_at_the_location(tiny: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc, err = _train_rc(capsys, *tiny["args"], f"algorithms.distillation.cache={tmp_path / 'none'}")
    assert rc == 2 and err.splitlines() == [err] and "no teacher cache at" in err and "usi-cache-teacher" in err


def _flip_inside_a_tensor(path: Path) -> None:
    """Flip 16 bytes in the middle of the file's tensor data (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = (header + len(data)) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped": ("rank0/ep0/ba1.safetensors", _flip_inside_a_tensor, "does not match its checksum"),
    "truncated": ("rank0/ep0/ba1.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a complete"),
    "empty": ("rank0/ep0/ba1.safetensors", lambda p: p.write_bytes(b""), "is empty"),
    "header": ("rank0/ep0/ba0.safetensors", lambda p: p.write_bytes(b"\x10" + p.read_bytes()[1:]), "not a complete"),
    "written.json": ("rank0/written.json", lambda p: p.write_text('{"batches": [[0, '), "not readable JSON"),
    "cache.json": ("cache.json", lambda p: p.write_text("{not json"), "not readable JSON"),
}


@pytest.mark.parametrize("fault", CORRUPTIONS)
def test_a_corrupt_cache_stops_the_run_in_one_line_before_a_step_uses_it(
    tiny: dict, fault: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    name, corrupt, says = CORRUPTIONS[fault]
    cache = tmp_path / "cache"
    shutil.copytree(tiny["cache"], cache)
    corrupt(cache / name)
    rc, err = _train_rc(capsys, *tiny["args"], f"algorithms.distillation.cache={cache}", "teacher.checkpoint=null")
    line = one_error_line(err)
    assert rc == 2, err
    assert str(cache / name) in line and says in line, line
    assert "usi-cache-teacher" in line, "it says how to repair it"
    assert "Traceback" not in err


def test_a_writer_never_writes_into_another_runs_cache_or_someone_elses_folder(
    tiny: dict, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    before = sorted(p.stat().st_mtime_ns for p in tiny["cache"].rglob("*"))
    rc, err = _train_rc(capsys, *tiny["args"], f"algorithms.distillation.cache_write={tiny['cache']}", "trainer.seed=5")
    assert rc == 2 and err.splitlines() == [err] and "holds the teacher outputs of another run (trainer.seed" in err
    rc, err = _train_rc(
        capsys,
        *tiny["args"],
        f"algorithms.distillation.cache_write={tiny['cache']}",
        "algorithms.distillation.cache_format=topk",
        "algorithms.distillation.cache_topk=2",
    )
    assert rc == 2 and "holds a full cache, this run writes topk (k=2)" in err
    assert sorted(p.stat().st_mtime_ns for p in tiny["cache"].rglob("*")) == before
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    rc, err = _train_rc(capsys, *tiny["args"], f"algorithms.distillation.cache_write={folder}")
    assert rc == 2 and "is a folder with other files in it, not a teacher cache" in err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_reading_without_the_teacher_weights_skips_their_hash_and_builds_no_teacher(
    tiny: dict, caplog: pytest.LogCaptureFixture
) -> None:
    from usi_composer.training import train

    cfg = load_config(
        DEMO, [*tiny["args"], f"algorithms.distillation.cache={tiny['cache']}", "teacher.checkpoint=null"]
    )
    with caplog.at_level(logging.INFO, logger="usi_composer.teacher_cache"):
        trainer = train(cfg)
    kd = next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))
    assert kd.teacher is None and int(trainer.state.timestamp.batch) == 2
    assert any(
        "names no teacher weights" in r.getMessage() and "not compared" in r.getMessage() for r in caplog.records
    )
    trainer.close()


# --------------------------------------------------------------------------- exact: bit-identical to the online teacher

N_SAMPLES, BATCH = 40, 8  # 5 batches per epoch, as tests/test_exact_resume.py
EXACT = [
    *tiny_run(**USI_CPU),
    "model.name=resnet10t",
    "algorithms.distillation.enabled=true",
    "teacher.name=resnet10t",
    "teacher.pretrained=false",
    "algorithms.mixup_cutmix.enabled=true",
    "algorithms.ema.enabled=true",
    "algorithms.ema.best_of_raw=false",
    f"data.num_classes={N_SAMPLES // 2}",
    "data.num_workers=2",
    "data.persistent_workers=true",
    f"trainer.global_batch_size={BATCH}",
    "trainer.max_duration=12ba",
    "trainer.save_interval=4ba",
    "trainer.seed=11",
]


def _run(script: list[str], args: list[str]) -> None:
    result = run([sys.executable, *script, "yamls/usi.yaml", *args], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _checkpoint(folder: Path, batch: int) -> Path:
    (path,) = folder.glob(f"ep*-ba{batch}-rank0.pt")
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("source", ["mds", "folders"])
def test_a_run_reading_a_full_cache_ends_bit_identical_to_the_online_run(
    image_folders, mds_dataset, saved_teacher, tmp_path: Path, source: str
) -> None:
    """(a) trains online and fills a cache as it trains; (b) usi-cache-teacher fills another with no
    student; (c) reads (b)'s from scratch; (d) resumes (c)'s batch-8 checkpoint reading (a)'s. The
    two caches hold equal tensors, and (a), (c) and (d) end with equal weights, EMA weights and
    optimizer state (12 batches over three epochs, random crops, RandAugment, MixUp/CutMix, EMA)."""
    if source == "mds":
        data = [f"data.local={mds_dataset(N_SAMPLES // 2, 2, '256kb')}", "data.streaming.val_split=null"]
    else:
        data = [f"data.train_dir={image_folders(N_SAMPLES // 2, 2) / 'train'}", "data.val_dir=null"]
    args = [*EXACT, *data, f"teacher.checkpoint={saved_teacher('resnet10t', N_SAMPLES // 2)}"]

    def folder(name: str) -> list[str]:
        return [f"trainer.save_folder={tmp_path / name}", f"trainer.run_name={name}"]

    cache_a, cache_b = tmp_path / "cache-a", tmp_path / "cache-b"
    _run(["train.py"], [*args, *folder("a"), f"algorithms.distillation.cache_write={cache_a}"])
    _run(["-m", "usi_composer.cli.cache_teacher"], [*args, "--out", str(cache_b)])
    objects = sorted(p.relative_to(cache_a) for p in cache_a.rglob("*.safetensors"))
    assert len(objects) == 12
    assert objects == sorted(p.relative_to(cache_b) for p in cache_b.rglob("*.safetensors"))
    for name in objects:  # the null student's run feeds the teacher the training run's inputs
        a, b = load_file(cache_a / name), load_file(cache_b / name)
        assert a.keys() == b.keys() == {"logits.0"} and all(torch.equal(a[k], b[k]) for k in a), name

    _run(["train.py"], [*args, *folder("c"), f"algorithms.distillation.cache={cache_b}"])
    resume = f"trainer.load_path={_checkpoint(tmp_path / 'c', 8)}"
    _run(["train.py"], [*args, *folder("d"), f"algorithms.distillation.cache={cache_a}", resume])
    online = _checkpoint(tmp_path / "a", 12)
    assert online.name.startswith("ep2-"), "the run crosses two epoch boundaries"
    for cached in (_checkpoint(tmp_path / "c", 12), _checkpoint(tmp_path / "d", 12)):
        diffs = differences(online, cached)
        assert diffs == [], (cached, diffs)


def test_a_topk_cache_is_close_to_the_full_one(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A top-2 cache of 4 classes trains (the teacher is not built) and its KD targets are the full
    cache's top-2 probabilities and tail mass."""
    args = [*tiny["args"], "algorithms.distillation.cache_format=topk", "algorithms.distillation.cache_topk=2"]
    cache = tmp_path / "topk"
    assert cache_teacher.main([DEMO, *args, "--out", str(cache)]) == 0
    for name in ("rank0/ep0/ba0.safetensors", "rank0/ep0/ba1.safetensors"):
        full, top = load_file(tiny["cache"] / name), load_file(cache / name)
        p = full["logits.0"].double().softmax(-1)
        q = decode({k.split(".")[0]: v for k, v in top.items()}, "topk", NUM_CLASSES).double().softmax(-1)
        assert math.isclose(F.kl_div(q.log(), p, reduction="batchmean").item(), 0.0, abs_tol=0.05)
        top2 = p.topk(2, dim=-1).indices
        torch.testing.assert_close(q.gather(-1, top2), p.gather(-1, top2), rtol=1e-5, atol=1e-6)
    read = [f"algorithms.distillation.cache={cache}", "teacher.checkpoint=null"]
    # the format is training math: a run reading a top-k cache says so (else refused, naming what to set)
    assert train_cli.main([DEMO, *tiny["args"], *read]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        f"error: algorithms.distillation.cache_format: the teacher cache at {cache} holds the top 2 logits: set "
        "algorithms.distillation.cache_format=topk algorithms.distillation.cache_topk=2"
    ), line
    assert train_cli.main([DEMO, *args, *read]) == 0


# --------------------------------------------------------------------------- sweeps: one cache per group


def _configs(points: list[list[str]]) -> dict[str, object]:
    return {" ".join(p): load_config(DEMO, p) for p in points}


def test_sweeps_share_a_cache_where_the_teachers_inputs_are_the_same() -> None:
    from usi_composer.ablate.caches import plan_teacher_caches, run_order

    # temperature x seed: one cache per seed, filled by its first point
    grid = [[f"algorithms.distillation.temperature={t}", f"trainer.seed={s}"] for t in (0.5, 1.0, 2.0) for s in (0, 1)]
    plans = plan_teacher_caches(_configs(grid), "/c")
    roles = [(p.role, p.uri) for p in plans.values()]
    seed0, seed1 = roles[0][1], roles[1][1]
    assert seed0 != seed1 and seed0.startswith("/c/")
    assert roles == [
        ("write", seed0),
        ("write", seed1),
        ("read", seed0),
        ("read", seed1),
        ("read", seed0),
        ("read", seed1),
    ]
    # alpha, ce_weight, the learning rate and backbones of one normalization share one cache
    same = [["algorithms.distillation.alpha=1.0"], ["algorithms.distillation.ce_weight=0"], ["optimizer.lr=1e-3"]]
    same += [["model.name=deit_tiny_patch16_224"], ["model.name=levit_128s"]]
    assert {p.uri for p in plan_teacher_caches(_configs(same), "/c").values()} == {seed0}
    # what changes the teacher's inputs runs alone, online
    other = [[], ["data.image_size=48"], ["data.hflip=0.5"], ["algorithms.mixup_cutmix.enabled=false"]]
    other += [["model.name=resnet10t", "data.mean=null", "data.std=null"], ["teacher.img_size=64"]]  # timm's mean
    plans = plan_teacher_caches(_configs(other), "/c")
    assert [p.role for p in plans.values()] == ["online"] * len(other)
    # durations: the longest fills the cache and runs first
    durations = _configs([[f"trainer.max_duration={d}"] for d in ("2ep", "8ep", "4ep")])
    plans = plan_teacher_caches(durations, "/c")
    assert [p.role for p in plans.values()] == ["read", "write", "read"]
    assert run_order(list(durations), plans) == [
        "trainer.max_duration=8ep",
        "trainer.max_duration=2ep",
        "trainer.max_duration=4ep",
    ]
    # no distillation, or a point's own cache: left alone
    own = _configs([["algorithms.distillation.enabled=false"], ["algorithms.distillation.cache=/mine"]] * 1)
    assert [p.role for p in plan_teacher_caches(own, "/c").values()] == ["online", "online"]


@pytest.mark.slow
def test_usi_ablate_fills_one_cache_and_its_readers_train_as_online(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A two-point temperature sweep through usi-ablate: the first point fills the cache, the second reads it
    (its teacher is not run) and ends with the metrics the same point reaches with its teacher online."""
    from helpers import DEMO_YAML, REPO
    from usi_composer.cli import ablate as ablate_cli

    base = tmp_path / "student.yaml"  # not demo.yaml: no demo teacher to prepare
    base.write_text(DEMO_YAML.read_text())
    sweep = str(REPO / "yamls" / "sweeps" / "temperature.yaml")
    data, teacher = tiny["data"], tiny["teacher"]
    common = [sweep, "--base", str(base), *tiny_run(data, teacher_weights=teacher, **DEMO_CPU), "model.name=resnet10t"]
    out = tmp_path / "cached"
    assert ablate_cli.main([*common, "--out", str(out), "--values", "algorithms.distillation.temperature=1.0,4.0"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (cache,) = (out / "teacher-cache").iterdir()
    assert [r["teacher"] for r in rows] == [f"filled {cache}", f"read {cache}"]
    assert len(list(cache.rglob("*.safetensors"))) == 2
    assert f"algorithms.distillation.cache={cache}" in Path(rows[1]["log"]).read_text().splitlines()[0]
    report = (out / "temperature.md").read_text()
    assert "| point | teacher |" in report and f"| algorithms.distillation.temperature=4.0 | read {cache} |" in report

    online = tmp_path / "online"
    args = [*common, "--out", str(online), "--values", "algorithms.distillation.temperature=4.0", "--no-teacher-cache"]
    assert ablate_cli.main(args) == 0
    (row,) = [json.loads(line) for line in (online / "results.jsonl").read_text().splitlines()]
    assert row["teacher"] == "online" and not (online / "teacher-cache").exists()
    assert row["metrics"] == rows[1]["metrics"]  # exactly: the cached teacher is the online one
    assert "| point | teacher |" not in (online / "temperature.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_each_store_and_read_their_own_microbatches(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """DDP with 2 processes (gloo): a run filling a cache as it trains and a run reading it end equal,
    every rank's outputs are under its own rank, and a run of another world size is refused."""
    from helpers import launch

    cache = tmp_path / "cache"
    args = [*tiny["args"], "trainer.max_duration=2ba", "trainer.save_interval=2ba"]

    def train(name: str, *extra: str) -> Path:
        logs = tmp_path / f"logs-{name}"
        logs.mkdir()
        folder = [f"trainer.save_folder={tmp_path / name}", f"trainer.run_name={name}"]
        result, tails = launch(2, logs, "train.py", DEMO, *args, *folder, *extra, timeout=300)
        assert result.returncode == 0, tails
        (checkpoint,) = (tmp_path / name).glob("ep*-ba2-rank0.pt")
        return checkpoint

    online = train("online", f"algorithms.distillation.cache_write={cache}")
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.safetensors")) == [
        f"rank{r}/ep0/ba{b}.safetensors" for r in (0, 1) for b in (0, 1)
    ]
    first = {r: load_file(cache / f"rank{r}" / "ep0" / "ba0.safetensors")["logits.0"] for r in (0, 1)}
    assert first[0].shape == (4, NUM_CLASSES) and not torch.equal(first[0], first[1])  # each rank's own samples
    cached = train("cached", f"algorithms.distillation.cache={cache}")
    assert differences(online, cached) == []
    # one process: another world size, another layout of the batches
    rc, err = _train_rc(capsys, *args, f"algorithms.distillation.cache={cache}")
    assert rc == 2 and "plan.world_size = 2, this run has 1" in err, err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_prints_one_json_line_of_consistent_figures() -> None:
    from helpers import run_cli

    tiny = ["--batch-size", "64", "--image-size", "16", "--teacher", "resnet10t", "--steps", "2", "--warmup", "1"]
    args = [*tiny, "--runs", "1", "--points", "2", "--epochs", "1", "--sweep-runs", "1"]
    result = run_cli("benchmarks/teacher_cache.py", *args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("{"), result.stdout
    r = json.loads(lines[0])
    assert (r["benchmark"], r["student"], r["teacher"], r["points"]) == ("teacher_cache", "resnet10t", "resnet10t", 2)
    for key in ("student_step_ms", "online_step_ms", "cache_step_ms", "sweep_online_s", "sweep_cached_s"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert r["cache_vs_student"] == pytest.approx(r["cache_step_ms"] / r["student_step_ms"], rel=1e-3)
    assert r["read_path_ms"] == pytest.approx(r["cache_step_ms"] - r["student_step_ms"], abs=1e-3)
    assert r["sweep_cached_vs_floor"] == pytest.approx(r["sweep_cached_s"] / r["sweep_floor_s"], rel=1e-3)
    assert r["sweep_cached_vs_online"] == pytest.approx(r["sweep_cached_s"] / r["sweep_online_s"], rel=1e-3)
    # the digits' 10 classes in fp32: 40 bytes a sample in full, 6k + 4 in top-k (fp32 values, int16 indices)
    assert r["full_bytes_per_sample"] == 40.0
    assert [r[f"topk{k}_bytes_per_sample"] for k in (1, 2, 5)] == [10.0, 16.0, 34.0]
    errors = [r[f"topk{k}_kd_rel_error_T{t}"] for k in (1, 2, 5) for t in (1, 4)]
    assert all(0 <= e < 1 for e in errors), errors


# --------------------------------------------------------------------------- usi-cache-teacher run again


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_complete_cache_is_skipped_and_a_longer_run_is_not(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny["cache"], cache)
    before = _mtimes(cache)
    capsys.readouterr()
    assert cache_teacher.main([DEMO, *tiny["args"], "--out", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out == f"teacher cache {cache}: done before, skipped (it holds this run; --overwrite rewrites it)\n"
    assert _mtimes(cache) == before
    # another run's teacher inputs: not this run's cache, so not skipped (the writer refuses it instead)
    assert cache_teacher.main([DEMO, *tiny["args"], "trainer.seed=5", "--out", str(cache)]) == 2
    assert "holds the teacher outputs of another run (trainer.seed" in capsys.readouterr().err
    # a longer run than the cache holds: filled on
    assert cache_teacher.main([DEMO, *tiny["args"], "trainer.max_duration=2ep", "--out", str(cache)]) == 0
    assert "done before" not in capsys.readouterr().out
    assert CacheStore(str(cache)).read_json("rank0/written.json") == {"batches": [[0, 4]]}


def test_overwrite_deletes_only_the_caches_own_files(tiny: dict, tmp_path: Path) -> None:
    from usi_composer.teacher_cache.fill import remove_cache

    cache = tmp_path / "cache"
    shutil.copytree(tiny["cache"], cache)
    (cache / "notes.txt").write_text("keep me")
    (cache / "rank0" / "mine.txt").write_text("keep me")
    (cache / "rank0" / "ep0" / ".tmp-0123456789ab-ba2.safetensors").write_bytes(b"left by a killed writer")
    assert remove_cache(str(cache)) == 5  # cache.json, written.json, 2 batches, the temporary file
    assert sorted(_mtimes(cache)) == ["notes.txt", "rank0/mine.txt"]


def test_overwrite_rewrites_a_complete_cache_and_its_files_follow_the_umask(tiny: dict, tmp_path: Path) -> None:
    import os
    import subprocess

    cache = tmp_path / "cache"
    shutil.copytree(tiny["cache"], cache)
    before = _mtimes(cache)
    command = [sys.executable, "-m", "usi_composer.cli.cache_teacher", DEMO, *tiny["args"], "--out", str(cache)]
    result = subprocess.run(
        [*command, "--overwrite"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(0o027),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"\nteacher cache {cache}: 2 batches (1 epochs)" in result.stdout, result.stdout
    after = _mtimes(cache)
    assert sorted(after) == sorted(before) and all(after[name] > before[name] for name in before)
    modes = {oct(p.stat().st_mode & 0o777) for p in cache.rglob("*") if p.is_file()}
    assert modes == {oct(0o640)}  # 0o666 less the umask, as open() would make them
