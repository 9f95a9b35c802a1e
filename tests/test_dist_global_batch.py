"""passreid.dist.batch: the global batch on every process (gathered outputs with gradients, synchronised BN).

The 2-process (gloo) test trains a small conv + BNNeck model one step under DDP, each rank on its half of a
global batch, and compares the loss, the averaged gradients, the input gradients and the BN running statistics
with one process on the whole batch; without the gather and the BN sync the same run differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _ports import free_port
from _spawn import leave_group_after, start_workers, wait_for_workers
from torch import nn

from passreid.dist import PortableSyncBatchNorm, convert_sync_batchnorm, gather_batch
from passreid.losses.reid import batch_hard_triplet_loss

GLOBAL_BATCH = 16  # 4 identities x 4 images; each of 2 ranks gets 2 whole identities, as the P x K sampler does
NUM_CLASSES = 4
CPU = torch.device("cpu")


@dataclass
class _Output:
    logits: list[torch.Tensor]
    feats: torch.Tensor
    weight: float = 1.0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class _ConvNeckModel(nn.Module):
    """conv + BatchNorm2d + pooling + linear + BNNeck (BatchNorm1d) + classifier: both kinds of BN layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(6)
        self.embed = nn.Linear(6, 8)
        self.neck = nn.BatchNorm1d(8)
        self.classifier = nn.Linear(8, NUM_CLASSES, bias=False)

    def forward(self, images: torch.Tensor) -> _Output:
        maps = F.relu(self.bn2d(self.conv(images)))
        feats = self.embed(maps.mean(dim=(2, 3)))
        return _Output(logits=[self.classifier(self.neck(feats))], feats=feats)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, 5, 4, generator=generator) * 2.0 + 0.5  # not centred: a wrong BN mean shows
    labels = torch.arange(NUM_CLASSES).repeat_interleave(GLOBAL_BATCH // NUM_CLASSES)
    return images, labels


def _fresh_model() -> _ConvNeckModel:
    torch.manual_seed(3)
    return _ConvNeckModel()


def _loss(output: _Output, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits[0], labels) + batch_hard_triplet_loss(output.feats, labels)


def _one_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, gather: bool) -> dict:
    images = images.clone().requires_grad_(True)
    output = model(images)
    if gather:
        output, labels = gather_batch((output, labels), images.shape[0])
    loss = _loss(output, labels)
    loss.backward()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"loss": float(loss.detach()), "input_grad": images.grad.detach().clone(),
            "grads": {name: p.grad.detach().clone() for name, p in inner.named_parameters()},
            "buffers": {name: b.detach().clone() for name, b in inner.named_buffers()}}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from passreid import dist

    dist.init_distributed(dist.DistEnv(rank, world_size, rank, "127.0.0.1", port, "torchrun"))

    def train() -> None:
        images, labels = _global_batch()
        shard = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        results = {}
        for mode in ("global", "local"):
            model = _fresh_model()
            if mode == "global":
                model = convert_sync_batchnorm(model, CPU)
            ddp = nn.parallel.DistributedDataParallel(model)
            results[mode] = _one_step(ddp, images[shard], labels[shard], gather=mode == "global")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")

    leave_group_after(train)


@pytest.fixture(scope="module")
def two_process_step(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("global_batch")
    context = start_workers(_worker, (2, free_port(), str(out_dir)))
    wait_for_workers(context, 240, "2-process global-batch step")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _reference_step() -> dict:
    images, labels = _global_batch()
    return _one_step(_fresh_model(), images, labels, gather=False)


# fp32 throughout; the 2-process run sums the same terms in another order (per-rank BN partial sums combined by
# Chan's formula, DDP's average of two half-batch gradients), which moves results by a few ulps of the largest
# entries. Tolerance: 1e-5 relative, plus 1e-5 of the largest entry of the compared set as an absolute floor
# (entries whose exact value is 0, e.g. the gradient of a bias followed by a BN, hold only such round-off);
# ~100x the round-off and far below the local-mode differences (> 1e-2 of the largest entry).
RTOL = 1e-5


def _assert_all_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    scale = max(float(value.float().abs().max()) for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].float(), value.float(), rtol=RTOL, atol=RTOL * scale, msg=name)


@pytest.mark.multiprocess
@pytest.mark.slow  # spawning two interpreters with torch takes ~10-20 s on a busy 2-core machine
def test_two_processes_on_the_global_batch_equal_one_process(two_process_step):
    reference = _reference_step()
    half = GLOBAL_BATCH // 2
    for rank, result in enumerate(two_process_step):
        got = result["global"]
        assert got["loss"] == pytest.approx(reference["loss"], rel=RTOL)
        # A rank's input gradient is that of the sum of the 2 ranks' (equal) losses: twice the 1-process gradient
        # of its samples; DDP's average over the ranks turns the parameter gradients into the 1-process ones.
        _assert_all_close({"input": got["input_grad"]},
                          {"input": 2 * reference["input_grad"][rank * half:(rank + 1) * half]})
        _assert_all_close(got["grads"], reference["grads"])
        _assert_all_close(got["buffers"], reference["buffers"])  # BN running mean / var of the global batch


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_shards_differ_from_one_process(two_process_step):
    reference = _reference_step()
    local = two_process_step[0]["local"]
    assert abs(local["loss"] - reference["loss"]) > 1e-2 * abs(reference["loss"])
    difference = max(float((local["grads"][name] - grad).abs().max()) for name, grad in reference["grads"].items())
    assert difference > 1e-2 * max(float(grad.abs().max()) for grad in reference["grads"].values())


# ------------------------------------------------------------------------------ one process, no group


def test_gather_batch_is_the_identity_on_one_process():
    output = _Output(logits=[torch.ones(4, 3)], feats=torch.zeros(4, 2), extra={"rows": torch.arange(4)})
    gathered = gather_batch({"out": output, "labels": torch.arange(4), "note": "kept"}, batch_size=4)
    assert gathered["note"] == "kept" and gathered["out"].weight == 1.0
    assert gathered["out"].logits[0] is output.logits[0] and gathered["labels"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("extra, where", [
    ({"loss": torch.tensor(1.0)}, r"output\.extra\['loss'\] has shape \(\)"),
    ({"prototypes": torch.zeros(3, 2)}, r"output\.extra\['prototypes'\] has shape \(3, 2\)"),
])
def test_gather_batch_refuses_tensors_that_are_not_per_sample(extra, where):
    with pytest.raises(ValueError, match=where):
        gather_batch(_Output(logits=[torch.ones(4, 3)], feats=torch.zeros(4, 2), extra=extra), batch_size=4)


def test_converted_model_keeps_its_parameters_and_state_dict_keys():
    model = _fresh_model()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, CPU)
    assert isinstance(converted.bn2d, PortableSyncBatchNorm) and isinstance(converted.neck, PortableSyncBatchNorm)
    assert all(p is params[name] for name, p in converted.named_parameters())  # an existing optimizer still works
    assert list(converted.state_dict()) == keys


def test_sync_batchnorm_on_one_process_is_batchnorm():
    images, labels = _global_batch()
    plain, synced = _fresh_model(), convert_sync_batchnorm(_fresh_model(), CPU)
    expected, got = _one_step(plain, images, labels, gather=False), _one_step(synced, images, labels, gather=False)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)  # the same torch kernels on the same input
    for name, buffer in expected["buffers"].items():
        torch.testing.assert_close(got["buffers"][name], buffer, msg=name)
