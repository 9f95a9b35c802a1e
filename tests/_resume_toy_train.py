"""Toy training run used by tests/test_resume.py (run as a script, in a subprocess).

A small MLP with dropout on noisy random data, SGD with momentum + StepLR stepped per
iteration, a seeded shuffled sampler that can start mid-epoch, and randomness drawn from
torch (dropout, input noise), numpy (loss scale) and Python ``random`` (dropped feature).
It checkpoints after every step, appends ``<iteration> <loss as float.hex>`` to a losses file,
and with ``--kill-after T`` SIGKILLs itself right after saving step T.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from passreid.engine import Checkpointer, build_checkpoint, check_finite, restore_checkpoint, seed_everything

NUM_SAMPLES = 48
BATCH_SIZE = 8  # 6 steps per epoch
FEATURES = 16
CLASSES = 4
SEED = 0


class NoisyDataset(Dataset):
    """Fixed random points; every read adds noise from the global torch RNG."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(NUM_SAMPLES, FEATURES, generator=generator)
        self.y = torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=generator)

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] + 0.1 * torch.randn(FEATURES), self.y[index]


class EpochShuffleSampler(Sampler[int]):
    """Permutation seeded by (seed, epoch); ``start`` skips samples already consumed."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator)[self.start :].tolist()

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, CLASSES))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--losses", required=True)
    parser.add_argument("--total-steps", type=int, required=True)
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-restore-rng", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)  # identical float reduction order in every run
    seed_everything(SEED)
    dataset = NoisyDataset()
    sampler = EpochShuffleSampler(NUM_SAMPLES, SEED)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    checkpointer = Checkpointer(args.output_dir)

    epoch, iteration, consumed = 0, 0, 0
    if args.resume:
        state = checkpointer.load()
        if state is None:
            raise SystemExit(f"--resume given but no checkpoint in {args.output_dir}")
        info = restore_checkpoint(
            state, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=not args.no_restore_rng
        )
        epoch, iteration, consumed = info.epoch, info.iteration, info.sampler["consumed"]

    model.train()
    with open(args.losses, "a", encoding="utf-8") as losses:
        while iteration < args.total_steps:
            sampler.set_position(epoch, consumed)
            # The loader's own generator: creating an iterator must not draw from the global RNG.
            loader = DataLoader(
                dataset, batch_size=BATCH_SIZE, sampler=sampler, generator=torch.Generator().manual_seed(epoch)
            )
            for inputs, targets in loader:
                inputs[:, random.randrange(FEATURES)] = 0.0
                scale = 1.0 + 0.1 * float(np.random.rand())
                loss = scale * nn.functional.cross_entropy(model(inputs), targets)
                check_finite(loss, iteration)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                iteration += 1
                consumed += BATCH_SIZE
                if consumed == NUM_SAMPLES:
                    epoch, consumed = epoch + 1, 0
                losses.write(f"{iteration} {loss.item().hex()}\n")
                losses.flush()
                checkpointer.save(
                    build_checkpoint(
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        epoch=epoch,
                        iteration=iteration,
                        sampler={"epoch": epoch, "consumed": consumed},
                        config={"seed": SEED, "batch_size": BATCH_SIZE},
                    )
                )
                if iteration == args.kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if iteration >= args.total_steps:
                    break


if __name__ == "__main__":
    main()
