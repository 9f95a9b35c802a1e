"""The GPU paths, run by ``pytest -m cuda`` (and by ``bench/gpu_check.sh``); every test here skips without CUDA.

* every stage (pre-training with ``data.augment_on`` cpu and gpu, fine-tuning, USL) trains two iterations on
  the generated world in bf16 autocast and in fp16 autocast + GradScaler and ends with finite figures;
* the device-side multi-crop gives the same views on the GPU as on the CPU;
* a one-process NCCL group: collectives and a DDP step equal to the plain step;
* faiss on the GPU (when faiss-gpu is installed) finds the torch backend's neighbours;
* ``train.batch_band_views``: the step with the band views in one pass equals the per-band step;
* marked ``inductor`` as well (``bench/gpu_check.sh --parts pytest_cuda_inductor``): ``train.compile`` on the
  GPU, the compiled step against the eager one and a compiled pre-training run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _spawn import process_group_of_one
import torch

from passreid.config import load_config

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ["bf16", "fp16"]


def _train_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if record["split"] == "train" and "loss" in record]


@pytest.mark.parametrize("augment_on", ["cpu", "gpu"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_pretraining_trains_on_the_gpu(synthetic_world, tmp_path, precision, augment_on):
    from passreid.pretrain.config import PretrainConfig
    from passreid.pretrain.trainer import run_pretraining

    cfg = load_config(PretrainConfig, None, [
        "model.arch=vit_tiny", "model.img_size=[64,32]", "model.out_dim=256", "model.hidden_dim=128",
        "model.bottleneck_dim=64", "crops.global_size=[64,32]", "crops.local_size=[32,16]", "monitor.period=0",
        "train.log_period=1", f"train.precision={precision}", "train.device=cuda", f"data.augment_on={augment_on}",
        "data.dataset=image_folder", f"data.root={synthetic_world / 'pool'}", "data.batch_size_per_gpu=8",
        "data.num_workers=0", "train.max_iters=2", f"train.output_dir={tmp_path}"])
    result = run_pretraining(cfg)
    assert result.iteration == 2
    losses = _train_losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_finetuning_trains_and_evaluates_on_the_gpu(synthetic_world, tmp_path, precision):
    from passreid.finetune import FinetuneConfig, run_training

    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / "demo.yaml", [
        f"train.output_dir={tmp_path}", f"data.root={synthetic_world}/market", "model.img_size=[64,32]",
        "train.log_period=1", "data.test_batch_size=256", "train.device=cuda", f"train.precision={precision}",
        "train.max_iters=2"])
    result = run_training(cfg, resume=False)
    assert result.iterations == 2
    losses = _train_losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert result.final_metrics is not None and 0.0 <= result.final_metrics["mAP"] <= 1.0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_usl_clusters_and_trains_on_the_gpu(synthetic_world, tmp_path, precision):
    from passreid.usl import UslConfig, run_usl

    cfg = load_config(UslConfig, REPO / "configs" / "usl" / "demo.yaml", [
        f"train.output_dir={tmp_path}", f"data.root={synthetic_world}/market", "model.pretrained=none",
        "model.img_size=[64,32]", "model.drop_path_rate=0.0", "data.batch_size=16", "data.num_instances=4",
        "data.test_batch_size=64", "train.epochs=1", "train.iters=2", "train.log_period=1", "eval.period=1",
        "train.eval_at_start=false", "cluster.k1=10", "cluster.k2=3", "cluster.eps=0.7", "train.device=cuda",
        f"train.precision={precision}"])
    result = run_usl(cfg, resume=False)
    assert result.iterations == 2
    losses = _train_losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_device_multicrop_on_the_gpu_matches_the_cpu(synthetic_world):
    from passreid.data import build_dataset, read_image
    from passreid.data.device_multicrop import BatchedMultiCrop, MultiCropParamSampler, collate_device_samples
    from passreid.data.multicrop import IMAGENET_STD, MultiCropAugmentation
    from passreid.engine import seeded_global_rngs

    augmentation = MultiCropAugmentation(mode="pass")
    sampler = MultiCropParamSampler(augmentation)
    items = build_dataset("image_folder", str(synthetic_world / "pool")).train[:6]
    samples = []
    for index, item in enumerate(items):
        with seeded_global_rngs(index):
            samples.append({"views": sampler(read_image(item.path)), "index": index, "skipped": 0})
    batch = collate_device_samples(samples)
    augment = BatchedMultiCrop(augmentation)
    on_cpu = augment(batch["images"], batch["params"])
    on_gpu = augment(batch["images"].cuda(), {key: value.cuda() for key, value in batch["params"].items()})
    assert len(on_gpu) == len(on_cpu) == 11
    levels = 255.0 * min(IMAGENET_STD)  # normalised units -> grey levels (at most)
    for cpu_view, gpu_view in zip(on_cpu, on_gpu):
        assert gpu_view.shape == cpu_view.shape
        difference = (gpu_view.cpu() - cpu_view).abs() * levels
        # Float32 on both; the GPU may run the blur convolutions in TF32 (10-bit mantissa, ~1e-3 relative):
        # well under one grey level on average, a few at most.
        assert difference.mean() < 0.25 and difference.max() < 4.0


def test_one_process_nccl_group_collectives_and_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with process_group_of_one("nccl", tmp_path / "store"):
        torch.cuda.set_device(0)
        value = torch.arange(4.0, device="cuda")
        dist.all_reduce(value)
        assert value.tolist() == [0.0, 1.0, 2.0, 3.0]
        parts = [torch.empty(3, device="cuda")]
        dist.all_gather(parts, torch.ones(3, device="cuda"))
        assert parts[0].tolist() == [1.0, 1.0, 1.0]
        box = [{"k": 1}]
        dist.broadcast_object_list(box, src=0)
        assert box == [{"k": 1}]

        torch.manual_seed(0)
        plain = torch.nn.Linear(16, 4).cuda()
        wrapped = DistributedDataParallel(torch.nn.Linear(16, 4).cuda(), device_ids=[0])
        wrapped.module.load_state_dict(plain.state_dict())
        inputs = torch.randn(8, 16, device="cuda")
        plain(inputs).square().mean().backward()
        wrapped(inputs).square().mean().backward()
        # One rank: DDP's gradient all-reduce averages over one process, so the gradients are the plain ones
        # (up to the bucket copy, exact in float32).
        for a, b in zip(plain.parameters(), wrapped.module.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_faiss_gpu_knn_finds_the_torch_neighbours():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU support here (install the gpu extra: faiss-gpu)")
    from passreid.cluster import knn
    from passreid.cluster.knn import resolve_knn_backend

    assert resolve_knn_backend("auto", "cuda") == "faiss"
    x = np.random.default_rng(0).normal(size=(2000, 64)).astype(np.float32)
    d_torch, i_torch = knn(x, 20, backend="torch", device="cuda")
    d_faiss, i_faiss = knn(x, 20, backend="faiss", device="cuda")
    # Random Gaussian features have no exact ties; distances agree to float32 rounding of ~||x||² = 64
    # (the GPU kernels sum in different orders).
    torch.testing.assert_close(d_faiss, d_torch, rtol=1e-4, atol=1e-3)
    same = sum(set(a) == set(b) for a, b in zip(i_torch.tolist(), i_faiss.tolist()))
    assert same >= 0.99 * len(x)  # a near-tie at the 20th place may swap one neighbour in a few rows


def _tiny_meta_arch_on_the_gpu(drop_path_rate: float):
    from passreid.pretrain import PASSMetaArch

    torch.manual_seed(0)
    return PASSMetaArch("vit_tiny", (256, 128), out_dim=1024, hidden_dim=256, bottleneck_dim=64,
                        drop_path_rate=drop_path_rate).cuda()


def _assert_same_step_on_published_views(reference, other, what: str) -> None:
    """One fp32 step of each model on the same views of the published geometry (2 x 256x128 + 9 x 128x64): the
    same loss and gradients up to float32 rounding (rel 1e-4 on the loss, 1e-3 relative norm per gradient: kernels
    that sum in other orders, far below any step-to-step change of a gradient)."""
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 256, 128, generator=generator) for _ in range(2)] + [
        torch.randn(4, 3, 128, 64, generator=generator) for _ in range(9)]
    views = [view.cuda() for view in views]
    losses, grads = [], []
    for model in (reference, other):
        torch.manual_seed(2)  # the same drop-path draws for both
        loss, _ = model.forward_backward(views, epoch=0)
        losses.append(loss.item())
        grads.append({name: p.grad for name, p in model.named_trainable_parameters() if p.grad is not None})
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        relative = ((grads[1][name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        assert relative < 1e-3, f"{name}: {what} gradient off by {relative:.2e} (relative norm)"


def test_batched_band_views_step_matches_the_per_band_one_on_the_gpu():
    """train.batch_band_views on the GPU, drop path off (its masks are what a seed draws differently for one pass
    than for three): the step is the per-band step."""
    import copy

    per_band = _tiny_meta_arch_on_the_gpu(drop_path_rate=0.0)
    batched = copy.deepcopy(per_band)
    batched.student.batch_band_views = True
    _assert_same_step_on_published_views(per_band, batched, "batched")


@pytest.mark.inductor
def test_compiled_pretraining_step_matches_the_eager_one_on_the_gpu():
    """PASSMetaArch.compile_backbones with inductor on the published crop geometry (16x8 and 8x4 position
    grids), drop path on: the step is the eager one up to the reordered float32 sums of fused kernels, so the
    drop-path masks are the eager ones too. A backbone that resampled the position grid inside the graph would be
    off by percents in the position-embedding gradient (pretrain/README.md, train.compile)."""
    import copy

    eager = _tiny_meta_arch_on_the_gpu(drop_path_rate=0.1)
    compiled = copy.deepcopy(eager)
    compiled.compile_backbones("default")
    _assert_same_step_on_published_views(eager, compiled, "compiled")


@pytest.mark.inductor
def test_compiled_pretraining_trains_on_the_gpu(synthetic_world, tmp_path):
    from passreid.pretrain.config import PretrainConfig
    from passreid.pretrain.trainer import run_pretraining

    cfg = load_config(PretrainConfig, None, [
        "model.arch=vit_tiny", "model.img_size=[64,32]", "model.out_dim=256", "model.hidden_dim=128",
        "model.bottleneck_dim=64", "crops.global_size=[64,32]", "crops.local_size=[32,16]", "monitor.period=0",
        "train.log_period=1", "train.precision=bf16", "train.device=cuda", "train.compile=default",
        "data.augment_on=gpu", "data.dataset=image_folder", f"data.root={synthetic_world / 'pool'}",
        "data.batch_size_per_gpu=8", "data.num_workers=0", "train.max_iters=3", f"train.output_dir={tmp_path}"])
    result = run_pretraining(cfg)
    assert result.iteration == 3
    losses = _train_losses(tmp_path)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
