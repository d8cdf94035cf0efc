"""Checkpoint policies for ``CheckpointManager``: save rules (when ``maybe_save`` saves), keep
rules (which checkpoints retention keeps) and ``KeepFull`` (which kept ones keep their whole
state; the others are demoted to weights only). Rules combine with ``|`` and ``&``.

Implemented in ``shardckpt/manage/policy.py`` (save rules) and ``shardckpt/manage/keep.py``
(keep rules); docs/policies.md shows each with an example.
"""

from ..manage.keep import KeepBest, KeepEvery, KeepFull, KeepLast, KeepRule, KeepSteps
from ..manage.policy import (AtSteps, Auto, Continuous, EveryNEpochs, EveryNSeconds,
                             EveryNSteps, Initial, OnImprovement, SaveRule)

__all__ = ["SaveRule", "EveryNSteps", "EveryNEpochs", "EveryNSeconds", "AtSteps", "Initial",
           "OnImprovement", "Continuous", "Auto", "KeepRule", "KeepLast", "KeepBest",
           "KeepEvery", "KeepSteps", "KeepFull"]
