"""The training data's place in a checkpoint: a distributed sampler whose state is the job's
global position (it resumes exactly on any world size, counting what the loop consumed rather
than what DataLoader workers prefetched) and per-rank random generators with a rule for a new
world size."""

from .rng import RankRNG, seed_for
from .sampler import DistributedSampler
from .workers import preemption_safe

__all__ = ["DistributedSampler", "RankRNG", "preemption_safe", "seed_for"]
