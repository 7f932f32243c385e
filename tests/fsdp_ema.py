"""FusedEMA's storage under FSDP (v1, use_orig_params) on CPU/gloo, against Composer's EMA.

Composer's Trainer runs FSDP on GPUs only, but torch's FSDP runs on CPU: this checks the
shard-local update, the eval swap, and the checkpoint gather/scatter on 2 ranks with uneven shards
(some parameters have no elements on rank 1). Run by tests/test_ema.py:

    composer -n 2 tests/fsdp_ema.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from composer.algorithms.ema.ema import EMAParameters, compute_ema
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from helpers import RecordOps
from usi_composer.algorithms.ema import FusedEMAParameters


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(80, 3))
    model = nn.Module()  # as Composer wraps a ComposerModel's children
    model.module = FullyShardedDataParallel(
        net, use_orig_params=True, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(dist.get_rank())

    def step() -> None:
        model.module(torch.randn(4, 3, 6, 6, generator=g)).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    ours, composers = FusedEMAParameters(model), EMAParameters(model)  # Composer's: full tensors
    full_sizes = {n: t.numel() for n, t in composers.named_parameters()}
    assert any(t.numel() < full_sizes[n] for n, t in ours.named_parameters()), "ours holds this rank's shards"
    for _ in range(3):
        step()
        with RecordOps() as count:
            ours.update(model, 0.7)
        compute_ema(model, composers, 0.7)
    assert all("_foreach_" in op for op in count.ops), count.ops  # no collective, no per-tensor op

    # the gathered (checkpoint) form equals Composer's full average, and differs from the raw weights
    params, buffers = ours.full_dicts()
    raw = _full(model)
    for name, value in params.items():
        torch.testing.assert_close(value, composers.named_parameters_dict[name], rtol=1e-6, atol=1e-7)
        assert value.shape == raw[name].shape and not torch.equal(value, raw[name]), name
    for name, value in buffers.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, composers.named_buffers_dict[name], rtol=1e-6, atol=1e-7)

    # eval swap: the model holds the average, then its own weights again, exactly
    local = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours.swap_params(model)
    swapped = _full(model)
    assert all(torch.equal(swapped[n], params[n]) for n in params)
    model.eval()
    with torch.no_grad():
        model.module(torch.randn(2, 3, 6, 6))  # an eval forward leaves the shard views as they were
    ours.swap_params(model)
    model.train()
    assert all(torch.equal(p.detach(), local[n]) for n, p in model.named_parameters())

    # load: full tensors back to the same shards, the model untouched
    loaded = FusedEMAParameters.from_full(params, buffers)
    loaded.bind(model)
    assert all(torch.equal(loaded.named_parameters_dict[n], t) for n, t in ours.named_parameters())
    assert all(torch.equal(p.detach(), local[n]) for n, p in model.named_parameters())

    if dist.get_rank() == 0:
        (out_dir / "report.txt").write_text(f"ok, {dist.get_world_size()} ranks, {len(count.ops)} ops per update\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
