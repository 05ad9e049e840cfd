"""Samplers that shard by rank and can start an epoch part-way (exact resume)."""
from torch.utils.data import DistributedSampler, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of the order it is drawn in)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class TrainSampler(Sampler):
    """torch's DistributedSampler (per-epoch reshuffle, rank shards), yielding `(index, seed)` and able
    to skip the samples of the batches an interrupted epoch had already trained on."""

    def __init__(self, dataset, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.shards = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.seed, self.epoch, self.start = seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.shards.set_epoch(epoch)

    def indices(self) -> list[int]:
        """This epoch's sample indices on this rank, from the start position on."""
        return list(self.shards)[self.start :]

    def __iter__(self):
        for index in self.indices():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return len(self.shards) - self.start


class EvalSampler(Sampler):
    """Every `world_size`-th sample from `rank`: the shards cover the set exactly once, no padding."""

    def __init__(self, dataset, rank: int, world_size: int):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return ((i, 0) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)
