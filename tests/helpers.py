"""What the tests share: the repository and its data, running commands, a local S3 server, small
runs of the recipe, and files whose unpickling would run code. Fixtures live in ``conftest.py``
(pytest finds them there); everything else a test imports comes from here."""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
# USI_IMAGENET_SAMPLE: another copy (benchmarks/gpu_check.sh sets it where ../shared does not exist)
IMAGENET_SAMPLE = Path(os.environ.get("USI_IMAGENET_SAMPLE") or REPO.parent / "shared" / "data" / "imagenet-sample")
PYTHON = sys.executable


# --------------------------------------------------------------------------- processes


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op dispatched while active (``with RecordOps() as r: ...; r.ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo (``env`` added to ours), capturing text output."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``run`` with the test's Python in front of a script (``x.py``) or ``-m module``."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") or args[0] == "-m" else list(args)
    return run(cmd, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, logs: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, str]:
    """``composer -n world_size args...`` (Composer's launcher; gloo on CPU) on a free port, each
    rank's output in ``logs``. Returns the result and the tails of the ranks' logs."""
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        str(world_size),
        "--master_port",
        str(free_port()),
        "--stdout",
        str(logs / "rank{rank}.out"),
        "--stderr",
        str(logs / "rank{rank}.err"),
        *args,
    ]
    result = run(cmd, timeout=timeout)
    return result, "".join(p.read_text()[-2000:] for p in sorted(logs.glob("rank*.*")))


# --------------------------------------------------------------------------- real ImageNet samples, a local S3 server


def sample_root() -> Path:
    """The 1000 real ImageNet JPEGs (one per class) that the repo's CI places beside the clone."""
    train = IMAGENET_SAMPLE / "train"
    assert train.is_dir(), f"missing test data: {train.resolve()} (clone the repo next to shared/)"
    return IMAGENET_SAMPLE.resolve()


def sample_files() -> list[Path]:
    return sorted(sample_root().glob("train/*/*.JPEG"))


def make_imagenet(root: Path, n_classes: int, per_class: int = 1, start: int = 0) -> Path:
    """``root/train/<wnid>/*.JPEG`` from the real samples: ``n_classes`` classes, ``per_class``
    images each (the same real JPEG bytes under several names where per_class > 1)."""
    files = sample_files()[start : start + n_classes]
    for f in files:
        folder = root / "train" / f.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shutil.copyfile(f, folder / (f.name if k == 0 else f"{f.stem}_{k}.JPEG"))
    return root


def tree_hash(root: Path) -> dict[bytes, bytes]:
    """Every entry under ``root``: relative path (bytes: any name) -> sha256 of its bytes, or its link target."""
    entries: dict[bytes, bytes] = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):  # links are recorded, not followed (a loop stays one)
        for path in (os.path.join(folder, name) for name in dirs + files):
            rel = os.path.relpath(path, os.fsencode(root))
            plain = not os.path.islink(path) and not os.path.isdir(path)
            data = hashlib.sha256(Path(os.fsdecode(path)).read_bytes()).digest() if plain else b"folder"
            entries[rel] = b"link:" + os.readlink(path) if os.path.islink(path) else data
    return entries


def keys_and_labels(root: Path | str, split: str = "train", cache: Path | None = None) -> set[tuple[str, int]]:
    """``(key, label)`` of every sample of a converted split, as streaming reads it (``cache``: ``root`` is remote)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=str(root) if cache else None, local=str(cache or root), split=split, shuffle=False)
    return {(ds[i]["key"], int(ds[i]["label"])) for i in range(ds.num_samples)}


def convert(capsys: Any, *args: Any) -> tuple[int, str, str]:
    """``usi-convert-imagenet SRC --out OUT ARGS --no-progress`` in this process: exit code, stdout, stderr."""
    from usi_composer.cli.convert import main

    src, out, *rest = map(str, args)
    code = main([src, "--out", out, *rest, "--no-progress", "--workers", "1"])
    return code, *capsys.readouterr()


class MotoServer:
    """moto's standalone S3 server in a subprocess on 127.0.0.1 (a real HTTP S3 endpoint)."""

    def __init__(self, free_requests: int | None = None) -> None:
        # With free_requests=N, moto checks credentials (IAM) on every request after the first N.
        self.free_requests = free_requests
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        moto_server = Path(PYTHON).with_name("moto_server")
        cmd = [str(moto_server)] if moto_server.exists() else [PYTHON, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            env={
                **os.environ,
                **({"INITIAL_NO_AUTH_ACTION_COUNT": str(self.free_requests)} if self.free_requests is not None else {}),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.proc.poll() is None, "moto_server exited at start"
                time.sleep(0.1)
        raise AssertionError("moto_server did not start within 30 s")

    @contextlib.contextmanager
    def serving(self) -> Iterator[MotoServer]:
        """Started, with its endpoint and credentials in ``os.environ``; both undone on exit."""
        self.start()
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield self
        finally:
            self.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def env(self) -> dict[str, str]:
        """Environment for talking to this server only: endpoint and fake credentials."""
        return {
            "S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def client(self):  # -> boto3 S3 client
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )


# --------------------------------------------------------------------------- streaming's shared memory


@contextlib.contextmanager
def record_shared_memory() -> Iterator[list[Any]]:
    """Yields a list that gets every streaming ``SharedMemory`` made while active (streaming 0.13.0).

    Each ``StreamingDataset`` makes seven blocks, and streaming registers each one's ``cleanup`` with
    atexit: a block, and its open file descriptor, outlives its dataset until the process exits.
    """
    from streaming.base.shared import SharedMemory

    made: list[SharedMemory] = []
    init = SharedMemory.__init__

    def recording_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    SharedMemory.__init__ = recording_init
    try:
        yield made
    finally:
        SharedMemory.__init__ = init


def release_shared_memory(made: list[Any]) -> None:
    """Close (and unlink, where made here) the recorded blocks, as atexit would at exit; ``made`` keeps
    those still viewed by a live object (arrays of a dataset something holds: BufferError)."""
    if not made:
        return
    gc.collect()  # datasets that reference cycles keep alive: their arrays view the blocks
    kept = []
    for shm in made:
        try:
            shm.cleanup()
        except BufferError:
            kept.append(shm)
            continue
        atexit.unregister(shm.cleanup)
    made[:] = kept


def unlink_orphaned_shared_memory() -> list[str]:
    """Unlink this user's streaming blocks in ``/dev/shm`` that no process has open or mapped.

    A run killed by SIGKILL leaves its blocks (atexit never ran), and every later dataset opens each
    of them while looking for a free name, keeping the descriptors: a few hundred orphans, and one
    test's datasets exceed 1,024. Only orphans go: a block some live process holds is left alone.
    """
    from streaming.base.constant import SHM_TO_CLEAN

    kinds = "|".join(SHM_TO_CLEAN)
    blocks = Path("/dev/shm").glob("[0-9]*_*")
    ours = [p for p in blocks if re.fullmatch(rf"\d{{6}}_({kinds})", p.name) and p.stat().st_uid == os.getuid()]
    if not ours:
        return []
    held = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile, or another user's
            held.update(
                line.rsplit(" ", 1)[-1] for line in (proc / "maps").read_text().splitlines() if "/dev/shm/" in line
            )
            held.update(_descriptor_targets(proc))
    removed = []
    for block in ours:
        if str(block) not in held:
            with contextlib.suppress(FileNotFoundError):
                block.unlink()
                removed.append(block.name)
    return removed


def shared_memory_descriptors() -> int:
    """How many of this process's file descriptors are open on ``/dev/shm``."""
    return sum(target.startswith("/dev/shm/") for target in _descriptor_targets(Path("/proc/self")))


def _descriptor_targets(proc: Path) -> Iterator[str]:
    """What each open file descriptor of the process ``proc`` (``/proc/<pid>``) points at."""
    for fd in (proc / "fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor among them)
            yield os.readlink(fd)


# --------------------------------------------------------------------------- seconds-long runs of the recipe
# A tiny image folder and ``tiny_run``: the overrides that make a recipe train for a few batches in
# seconds (the folders and the teacher's weights come from conftest's fixtures).

DEMO_YAML = REPO / "yamls" / "demo.yaml"
STUDENT = "mobilenetv3_small_050"  # tiny timm models, fixed here so the tests do not follow demo tuning
TEACHER = "resnet10t"
NUM_CLASSES = 4
COMPILE_MODEL = "test_efficientnet"  # timm's tiny test CNN: compiles in seconds


def tiny_run(
    folder: Path | None = None, *extra: str, teacher_weights: Path | None = None, **sections: Any
) -> list[str]:
    """``key=value`` overrides that shrink a recipe to a run of seconds.

    ``folder``: an image-folder root (``train/``, and ``val/`` where it has one) in place of the
    recipe's data. ``teacher_weights``: saved weights for the teacher (``TEACHER`` unless ``teacher={"name": ...}``
    in ``sections``, not timm's pretrained ones); without it, distillation is off. ``sections``: config
    sections as nested dicts (``trainer={"max_duration": "2ba"}``, None for null), over the above.
    ``extra``: ``key=value`` strings, last. The progress bar is off unless a section turns it on.
    The kinds of run the tests share are the presets below: ``tiny_run(digits, **CHECKPOINTED)``.
    """
    keys: dict[str, Any] = {"trainer.progress_bar": False}
    if folder is not None:
        val = folder / "val"
        keys.update(
            {"data.local": None, "data.train_dir": folder / "train", "data.val_dir": val if val.is_dir() else None}
        )
    if teacher_weights is None:
        keys["algorithms.distillation.enabled"] = False
    else:
        keys.update({"teacher.name": TEACHER, "teacher.pretrained": False, "teacher.checkpoint": teacher_weights})
    keys.update(_flatten(sections))
    return [f"{key}={_yaml_value(value)}" for key, value in keys.items()] + list(extra)


def _flatten(sections: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in sections.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# tiny_run's presets (its keyword arguments), one per kind of run:
# yamls/usi.yaml's recipe on the CPU, small and plain; the data and the rest are the test's.
USI_CPU: dict[str, Any] = dict(
    model={"name": "resnet18"},
    algorithms={"mixup_cutmix": {"enabled": False}, "channels_last": False},
    data={"image_size": 16, "pin_memory": False},
    trainer={"device": "cpu", "precision": "fp32"},
)
# yamls/demo.yaml's recipe on tiny_image_folder (with a teacher): two batches of 8, one eval batch, no workers.
DEMO_CPU: dict[str, Any] = dict(
    model={"name": STUDENT},
    data={"num_classes": NUM_CLASSES, "image_size": 16, "num_workers": 0, "persistent_workers": False},
    trainer={
        "global_batch_size": 8,
        "eval_batch_size": 16,
        "max_duration": "2ba",
        "eval_interval": "2ba",
        "device": "cpu",
        "precision": "fp32",
    },
)
# yamls/demo.yaml's student (EMA, MixUp/CutMix, channels-last) as timm's 0.4M-parameter test_resnet,
# 8 images a batch, on the digits without evaluation or a teacher, checkpointing every batch.
CHECKPOINTED: dict[str, Any] = dict(
    model={"name": "test_resnet"},
    data={"val_dir": None},
    trainer={"global_batch_size": 8, "max_duration": "2ba", "save_interval": "1ba", "run_name": "tiny"},
)
# yamls/usi.yaml compiled, on the digits, with COMPILE_MODEL as student and teacher (give teacher_weights=).
COMPILED: dict[str, Any] = dict(
    model={"name": COMPILE_MODEL},
    teacher={"name": COMPILE_MODEL},
    data={"num_classes": 10, "image_size": 32, "num_workers": 0, "persistent_workers": False},
    trainer={"compile": True},
)


def tiny_image_folder(root: Path, per_class: int = 4, size: int = 16, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: NUM_CLASSES classes of noise."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(NUM_CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# --------------------------------------------------------------------------- checkpoints
# A seconds-long run of the demo recipe, and files whose unpickling would run code (writing a
# marker file, so a test can see whether it ran).

DEMO = "yamls/demo.yaml"  # as the checkpoint tests name it


class RunsCode:
    """Unpickling it runs a shell command that creates ``marker`` (``os.system``, as an attack would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system on Linux


def with_code(checkpoint: dict[str, Any], path: Path, marker: Path) -> Path:
    """``checkpoint`` plus one object whose unpickling creates ``marker``, saved to ``path``."""
    torch.save({**checkpoint, "extra": RunsCode(marker)}, path)
    return path


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- models, compilation, the gpu pipeline
# (shared by the CPU tests, tests/test_cpu_and_gpu.py and tests/test_gpu.py)

NUM_CLASSES_BN = 3  # tiny_bn_net's classes


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class GraphCount(Callback):
    """The number of graphs compiled so far, after each training batch and at the end of fit."""

    def __init__(self) -> None:
        self.after_batch: list[int] = []
        self.at_fit_end = -1

    def batch_end(self, state: State, logger: Logger) -> None:
        self.after_batch.append(unique_graphs())

    def fit_end(self, state: State, logger: Logger) -> None:
        self.at_fit_end = unique_graphs()


def assert_averaged_as_composer_does(ours: Any, theirs: Any, live: dict[str, torch.Tensor], updates: int) -> None:
    """FusedEMA's average ``ours`` (``FusedEMAParameters``) against Composer's ``theirs`` (``EMAParameters``)
    of the same training, whose raw tensors are ``live`` (every parameter and buffer by name) after
    ``updates`` updates: float tensors equal to fp32 rounding and unlike the raw ones, integer ones
    (num_batches_tracked) copied (Composer averages then truncates the count)."""
    averaged = {**theirs.named_parameters_dict, **theirs.named_buffers_dict}
    fused = {**ours.named_parameters_dict, **ours.named_buffers_dict}
    assert fused.keys() == averaged.keys() == live.keys()  # every parameter and buffer
    for name, value in fused.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, averaged[name], rtol=1e-6, atol=1e-7, msg=name)
            assert not torch.equal(value, live[name]), f"{name}: averaged weights must differ from the raw ones"
        else:
            assert torch.equal(value, live[name]) and int(value) == updates, name


def tiny_bn_net(layers: int = 1) -> torch.nn.Module:
    """A few convolutions with BatchNorm, 3 channels in, NUM_CLASSES_BN logits out (seeded)."""
    torch.manual_seed(0)
    body = [
        m
        for _ in range(layers)
        for m in (torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ]
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        *body,
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, NUM_CLASSES_BN),
    )


def to_pixels(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """Normalized images -> 0..255 floats."""
    return x * torch.tensor(std).view(1, 3, 1, 1) * 255 + torch.tensor(mean).view(1, 3, 1, 1) * 255


def quirky_images(data: bytes) -> dict[str, bytes]:
    """ImageNet's real oddities, made from a real JPEG."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = {}
    for name, mode, fmt in (("cmyk", "CMYK", "JPEG"), ("grayscale", "L", "JPEG"), ("png_named_jpeg", "RGB", "PNG")):
        buffer = io.BytesIO()
        img.convert(mode).save(buffer, fmt, quality=90)
        out[name] = buffer.getvalue()
    return out


class InputRecorder(Callback):
    """The inputs the model gets: after the device transform (and MixUp/CutMix)."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def before_forward(self, state: State, logger: Logger) -> None:
        if len(self.inputs) < 2:
            self.inputs.append(state.batch[0].detach().clone())
