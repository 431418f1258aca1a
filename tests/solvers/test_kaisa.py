"""solvers/kaisa.py: the grad-worker groups and the assignment record (the collectives run with real
processes in tests/engine/app/test_distributed.py)."""

from __future__ import annotations

import pytest

from engine.communicator import Communicator
from solvers.kaisa import KaisaPlan, worker_group_size


class FakeWorld(Communicator):
    def __init__(self, rank, size):
        super().__init__()
        self.rank, self.size, self.splits = rank, size, []

    def split(self, color, key):
        self.splits.append((color, key))
        return self


@pytest.mark.parametrize("fraction, size, g", [(1.0, 4, 4), (0.25, 4, 1), (0.5, 4, 2), (0.5, 2, 1), (1 / 3, 6, 2)])
def test_group_size(fraction, size, g):
    assert worker_group_size(fraction, size) == g


@pytest.mark.parametrize("fraction, size", [(0.3, 4), (1.5, 4), (0.0, 2), (0.4, 5)])
def test_a_fraction_without_whole_groups_is_one_sentence(fraction, size):
    with pytest.raises(ValueError) as err:
        worker_group_size(fraction, size)
    assert "\n" not in str(err.value) and "--grad-worker-fraction" in str(err.value)


def test_hybrid_groups_owners_and_record():
    """4 ranks, fraction 1/2: worker groups {0, 1} and {2, 3}; receivers pair rank r with r +- 2."""
    costs = {0: 10.0, 2: 8.0, 4: 3.0, 6: 1.0}
    plans = [KaisaPlan(FakeWorld(r, 4), costs, 0.5) for r in range(4)]
    assert plans[0].owner == {0: 0, 2: 1, 4: 2, 6: 3}  # greedy: one layer per rank, largest first
    assert [p.comm.splits for p in plans][3] == [(1, 3), (1, 3)]  # worker color r // 2, receiver color r % 2
    assert [p.grad_worker(2) for p in plans] == [True, True, False, False]
    assert [p.owns(4) for p in plans] == [False, False, True, False]
    rec = plans[0].record()
    assert rec["grad_workers_per_layer"] == 2 and rec["layers"]["4"] == {"owner": 2, "cost": 3.0, "grad_workers": [2, 3]}
