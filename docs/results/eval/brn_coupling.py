#!/usr/bin/env python
"""Why an equal-weight re-estimation that holds BRN's statistics at their trained values scores worse than the
trained network (docs/results/imagenette.md, the re-estimation diagnostic). Two measurements on one BRN run:

1. Over the same training batches (epoch 0, the run's groups and augmentation, weights frozen), each BRN
   layer's per-batch estimate of its mean and standard deviation is averaged twice: with every layer's
   running statistics held at the trained values (what `--precise-average equal` does), and with them
   moving by their own momentum as in training (`ema`). Both averages are compared with the trained
   statistics, per layer, in units of the trained standard deviation.
2. The held pass iterated: pass k holds the statistics at pass k-1's averages. If each layer's estimate
   depended only on its input data, pass 1 would already be self-consistent; BRN normalizes by its running
   statistics, so each pass re-measures every layer against the statistics the previous one replaced.

  OMP_NUM_THREADS=1 PYTHONPATH=src python docs/results/eval/brn_coupling.py <brn run dir> [--batches 256] [--passes 3]
"""
import argparse
import copy
import itertools
import sys

import torch
from omegaconf import OmegaConf

from mabn.data import build_loaders, resolve_root
from mabn.evaluation import EvalSettings, checkpoint_path, folder_loader, score_networks, sizes
from mabn.models.trained import load_trained
from mabn.norms import BatchRenorm2d
from mabn.precise_stats import recompute_running_stats
from mabn.train import source_version

STATS = ("running_mean", "running_std")


@torch.no_grad()
def average_estimates(net, batches, hold: bool) -> dict:
    """Each BRN layer's per-batch (mean, std) estimates averaged over `batches`, its running statistics held
    at their values or moving by its momentum; the estimate is read off the update, (new - (1-m) old) / m."""
    net = copy.deepcopy(net).train()
    layers = {name: m for name, m in net.named_modules() if isinstance(m, BatchRenorm2d)}
    start = {name: [getattr(m, s).double().clone() for s in STATS] for name, m in layers.items()}
    sums = {name: [0.0, 0.0] for name in layers}
    for x in batches:
        before = {name: [getattr(m, s).double().clone() for s in STATS] for name, m in layers.items()}
        net(x)
        for name, m in layers.items():
            for i, s in enumerate(STATS):
                sums[name][i] = sums[name][i] + (getattr(m, s).double() - (1 - m.momentum) * before[name][i]) / m.momentum
                if hold:
                    getattr(m, s).copy_(start[name][i])
    return {name: [total / len(batches) for total in pair] for name, pair in sums.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--batches", type=int, default=256)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    source = source_version()
    trained = load_trained(checkpoint_path(args.run))
    data = OmegaConf.merge(trained.config.data, dict(loader="torchvision", workers=1))
    loaders = build_loaders(data, 0, 1, trained.config.seed, "cpu")
    loaders.set_epoch(0)
    batches = [images for images, _, _ in itertools.islice(loaders.train, args.batches)]
    print(f"{trained.path} (step {trained.step}), {len(batches)} batches of {data.batch_per_gpu} of epoch 0; source {source}")

    trained_stats = {name: [getattr(m, s).double() for s in STATS]
                     for name, m in trained.net.named_modules() if isinstance(m, BatchRenorm2d)}
    held, free = average_estimates(trained.net, batches, True), average_estimates(trained.net, batches, False)
    print("\n| layer | mean: held | mean: moving | std: held | std: moving |\n|---|---|---|---|---|")
    for name, (mean, std) in trained_stats.items():
        cells = []
        for i in range(2):
            for estimate in (held, free):
                diff = (estimate[name][i] - trained_stats[name][i]) / std
                cells.append(f"{diff.abs().mean().item():.4f}")
        print(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    print("(mean |average estimate - trained| / trained std over the channels)")

    settings = EvalSettings(workers=1, progress=False, device="cpu")
    crop, resize = sizes(trained, settings)
    loader, labels_of, _ = folder_loader(trained, resolve_root(trained.config.data) / "val", crop, resize, settings, "cpu")
    networks, current = {"trained": trained.net}, trained.net
    for k in range(1, args.passes + 1):
        current = recompute_running_stats(current, batches_with_labels(batches), "cpu", False, average="equal").net
        networks[f"held pass {k}"] = current
    scores = score_networks(networks, loader, labels_of, "cpu", settings)
    print("\n| statistics | top-1 err | loss |\n|---|---|---|")
    for name in networks:
        print(f"| {name} | {scores[name]['top1_err']:.2f} | {scores[name]['loss']:.4f} |")
    return 0


def batches_with_labels(batches):
    return [(images, torch.zeros(len(images)), 0) for images in batches]


if __name__ == "__main__":
    sys.exit(main())
