"""The batch sampler: deterministic, bucket-pure, sharded without overlap, resumable."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cvgen.data.sampler import BucketBatchSampler

buckets = st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=60)


def flat(sampler: BucketBatchSampler) -> list[list[int]]:
    return [[i for i, _ in batch] for batch in sampler]


@settings(max_examples=50, deadline=None)
@given(bucket_of=buckets, bs=st.integers(1, 5), seed=st.integers(0, 100))
def test_batches_are_pure_deterministic_and_distinct(bucket_of, bs, seed) -> None:
    a = BucketBatchSampler(bucket_of, bs, seed=seed)
    b = BucketBatchSampler(bucket_of, bs, seed=seed)
    batches = flat(a)
    assert batches == flat(b)
    assert len(batches) == len(BucketBatchSampler(bucket_of, bs, seed=seed))
    seen = [i for batch in batches for i in batch]
    assert len(seen) == len(set(seen))
    for batch in batches:
        assert len(batch) == bs
        assert len({bucket_of[i] for i in batch}) == 1
    # every bucket yields all its full batches
    for b_id in set(bucket_of):
        n = sum(1 for x in bucket_of if x == b_id)
        assert sum(1 for batch in batches if bucket_of[batch[0]] == b_id) == n // bs


@settings(max_examples=30, deadline=None)
@given(bucket_of=buckets, bs=st.integers(1, 3), world=st.integers(2, 4))
def test_ranks_share_nothing_and_get_equal_counts(bucket_of, bs, world) -> None:
    per_rank = [
        flat(BucketBatchSampler(bucket_of, bs, seed=1, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(p) for p in per_rank}) == 1
    ids = [i for p in per_rank for batch in p for i in batch]
    assert len(ids) == len(set(ids))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(4, 40),
    bs=st.integers(1, 4),
    consumed=st.integers(0, 12),
    epochs=st.integers(0, 2),
)
def test_resume_continues_exactly(n, bs, consumed, epochs) -> None:
    ref = BucketBatchSampler([0] * n, bs, seed=3)
    stream = []
    for _ in range(epochs + 3):
        stream.extend(list(ref))
    per_epoch = n // bs
    consumed = min(consumed, per_epoch)

    run = BucketBatchSampler([0] * n, bs, seed=3)
    for _ in range(epochs):
        list(run)
    it = iter(run)
    for _ in range(consumed):
        next(it)
        run.mark_consumed()
    state = run.state_dict()

    resumed = BucketBatchSampler([0] * n, bs, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    start = epochs * per_epoch + consumed
    assert rest == stream[start : start + len(rest)]


def test_epochs_differ() -> None:
    s = BucketBatchSampler([0] * 16, 2, seed=0)
    assert flat(s) != flat(s)
