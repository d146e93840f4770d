"""The step schedule: every example once per epoch, disjoint rank shards, deterministic by seed."""

from __future__ import annotations

from lf_dist.train.schedule import StepSchedule, resolve_steps


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
    s = StepSchedule(num_examples=23, batch_size=4, accum=2, seed=1)
    assert s.batches_per_epoch == 6 and s.steps_per_epoch == 3
    seen = [i for step in range(3) for mb in s.step(step) for i in mb]
    assert sorted(seen) == list(range(23))
    again = StepSchedule(23, 4, 2, seed=1)
    assert [again.step(k) for k in range(6)] == [s.step(k) for k in range(6)]
    assert s.epoch_of(3) == 1 and s.step(3) != s.step(0)  # a new epoch is reshuffled


def test_rank_shards_are_disjoint_and_cover_the_global_batch():
    one = StepSchedule(32, 4, 1, seed=3)
    ranks = [StepSchedule(32, 2, 1, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(8):
        union = sorted(ranks[0].step(step)[0] + ranks[1].step(step)[0])
        assert not set(ranks[0].step(step)[0]) & set(ranks[1].step(step)[0])
        assert union == sorted(one.step(step)[0])


def test_total_steps_from_epochs_or_max_steps_and_fractional_intervals():
    s = StepSchedule(100, 8, 2, seed=0)  # 13 micro-batches, 7 steps per epoch
    assert s.total_steps(num_train_epochs=3.0, max_steps=-1) == 21
    assert s.total_steps(num_train_epochs=0.5, max_steps=-1) == 4
    assert s.total_steps(num_train_epochs=3.0, max_steps=5) == 5
    assert resolve_steps(0.1, 21) == 3 and resolve_steps(10, 21) == 10 and resolve_steps(0, 21) is None
