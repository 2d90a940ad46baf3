"""DistributedBucketBatchSampler: determinism, rank disjointness, carry-over, exact resume, DataLoader use.

Ranks are simulated by one sampler per rank in one process: the sampler is a pure function of its args.
"""

import json
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from train.data.sampler import DistributedBucketBatchSampler

# Uneven buckets so that remainders happen: 23 + 10 + 7 + 3 = 43 samples, mixed kinds.
SIZES = {("video", 480, 832): 23, ("video", 512, 512): 10, ("image", 512, 512): 7, ("image", 832, 480): 3}


def make_keys(seed: int = 0) -> list[tuple]:
    keys = [k for k, n in SIZES.items() for _ in range(n)]
    random.Random(seed).shuffle(keys)  # interleave buckets, as real metadata would
    return keys


def choose(rng: random.Random, key, indices=()) -> dict:
    size = rng.choice([512, 640, 768, 896, 1024])
    return {"size": size, "num_frames": 1 if key[0] == "image" else max(4 * (13312 * 64 // size**2 // 4) + 1, 1)}


def samplers(keys, world_size, batch_size=2, **kw):
    return [DistributedBucketBatchSampler(keys, batch_size, r, world_size, **kw) for r in range(world_size)]


def run_epoch(ranks, epoch):
    """All ranks' batches of one epoch, zipped by step: list of [batch of rank 0, batch of rank 1, ...]."""
    for s in ranks:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1, "ranks disagree on the number of steps"
    assert all(len(s) == len(b) for s, b in zip(ranks, per_rank, strict=True)), "len() is not exact"
    return list(zip(*per_rank, strict=True))


def test_deterministic_and_changes_with_epoch():
    keys = make_keys()
    a = list(DistributedBucketBatchSampler(keys, 2, 1, 2, seed=7, choose=choose))
    b = list(DistributedBucketBatchSampler(keys, 2, 1, 2, seed=7, choose=choose))
    assert a == b
    s = DistributedBucketBatchSampler(keys, 2, 1, 2, seed=7, choose=choose)
    s.set_epoch(1)
    assert list(s) != a
    other_seed = list(DistributedBucketBatchSampler(keys, 2, 1, 2, seed=8, choose=choose))
    assert other_seed != a
    # The same epoch twice without set_epoch repeats it, like DistributedSampler.
    s.set_epoch(0)
    assert list(s) == a and list(s) == a


def test_set_epoch_is_pure_in_epoch():
    keys = make_keys()
    seq = DistributedBucketBatchSampler(keys, 3, 0, 2, seed=1)
    for e in range(4):
        seq.set_epoch(e)
    jump = DistributedBucketBatchSampler(keys, 3, 0, 2, seed=1)
    jump.set_epoch(3)
    assert list(jump) == list(seq)
    back = DistributedBucketBatchSampler(keys, 3, 0, 2, seed=1)
    back.set_epoch(5)
    back.set_epoch(3)
    assert list(back) == list(seq)


@pytest.mark.parametrize("world_size", [2, 4])
def test_disjoint_coverage_and_carry_over(world_size):
    keys = make_keys()
    ranks = samplers(keys, world_size, batch_size=2, seed=3, choose=choose)
    g = 2 * world_size
    carry_in: list[int] = []
    for epoch in range(3):
        steps = run_epoch(ranks, epoch)
        carry_out = ranks[0].carry_out()
        assert all(s.carry_out() == carry_out for s in ranks)
        yielded = [i for step in steps for batch in step for i, _ in batch]
        # Exact accounting: what came in (every sample once + the carry) = what went out + new carry.
        assert Counter(yielded) + Counter(carry_out) == Counter(range(len(keys))) + Counter(carry_in)
        # The carry is less than one global batch per bucket, and carried entries go first: consumed
        # whenever their bucket fills a global batch (a bucket smaller than one keeps accumulating).
        per_bucket = Counter(keys[i] for i in carry_out)
        assert all(n < g for n in per_bucket.values())
        filled = {k for k in SIZES if SIZES[k] + sum(keys[i] == k for i in carry_in) >= g}
        assert not Counter(i for i in carry_in if keys[i] in filled) - Counter(yielded)
        if epoch == 0:  # no carry-in: every sample at most once, ranks disjoint
            assert len(yielded) == len(set(yielded))
            rank_sets = [{i for step in steps for i, _ in step[r]} for r in range(world_size)]
            assert sum(len(s) for s in rank_sets) == len(set().union(*rank_sets))
            assert sorted(yielded + carry_out) == list(range(len(keys)))
        assert len(steps) * g + len(carry_out) == len(keys) + len(carry_in)
        # A carried sample never shares a global batch with its fresh copy in a bucket of >= 1 batch.
        for step in steps:
            ids = [i for batch in step for i, _ in batch]
            if SIZES[keys[ids[0]]] >= g:
                assert len(ids) == len(set(ids))
        carry_in = carry_out
    assert carry_in, "the test data should produce remainders"


def test_one_bucket_and_one_extras_per_global_step():
    keys = make_keys()
    ranks = samplers(keys, 4, batch_size=2, seed=0, choose=choose)
    steps = run_epoch(ranks, 0)
    sizes = set()
    for step in steps:
        items = [item for batch in step for item in batch]
        assert all(len(batch) == 2 for batch in step)
        assert len({keys[i] for i, _ in items}) == 1
        assert len({json.dumps(e, sort_keys=True) for _, e in items}) == 1
        extras = items[0][1]
        assert extras["bucket"] == keys[items[0][0]]
        assert set(extras) == {"bucket", "epoch", "step", "size", "num_frames"}
        assert extras["epoch"] == 0
        sizes.add(extras["size"])
    assert [step[0][0][1]["step"] for step in steps] == list(range(len(steps)))
    assert len(sizes) > 1, "choose should vary across steps"
    # Each item owns its extras: mutating one does not touch the others.
    step = steps[0]
    step[0][0][1]["size"] = -1
    assert step[0][1][1]["size"] != -1


def test_repeats_apply_video_repeat():
    keys = make_keys()
    repeats = [3 if k[0] == "video" else 1 for k in keys]
    ranks = samplers(keys, 2, batch_size=1, seed=0, repeats=repeats)
    steps = run_epoch(ranks, 0)
    yielded = Counter(i for step in steps for batch in step for i, _ in batch)
    assert yielded + Counter(ranks[0].carry_out()) == Counter({i: r for i, r in enumerate(repeats)})


def test_drop_remainder_and_no_shuffle():
    keys = make_keys()
    s = DistributedBucketBatchSampler(keys, 2, 0, 2, remainder="drop")
    assert s.carry_out() == []
    assert len(s) == sum(n // 4 for n in SIZES.values())
    s.set_epoch(1)
    assert len(s) == sum(n // 4 for n in SIZES.values())
    ordered = DistributedBucketBatchSampler(keys, 2, 0, 1, shuffle=False)
    flat = [i for _, batch in ordered.global_batches() for i in batch]
    first_bucket = [i for i, k in enumerate(keys) if k == keys[0]]
    assert flat[: len(first_bucket) // 2 * 2] == first_bucket[: len(first_bucket) // 2 * 2]


def _resume_from(keys, state, **kw):
    s = DistributedBucketBatchSampler(keys, **kw)
    s.load_state_dict(json.loads(json.dumps(state)))
    return s


@pytest.mark.parametrize("rank", [0, 2])
def test_exact_mid_epoch_resume(rank):
    keys = make_keys()
    kw = dict(batch_size=2, rank=rank, world_size=3, seed=11, choose=choose)
    full = DistributedBucketBatchSampler(keys, **kw)
    reference = {}
    for e in range(3):
        full.set_epoch(e)
        reference[e] = list(full)
    assert full.state_dict()["carry_in"], "epoch 2 should start with a carry for this test to bite"

    # Mid epoch 0.
    s = DistributedBucketBatchSampler(keys, **kw)
    it = iter(s)
    consumed = [next(it) for _ in range(3)]
    assert consumed == reference[0][:3]
    resumed = _resume_from(keys, s.state_dict(), **kw)
    assert len(resumed) == len(reference[0]) - 3
    assert list(resumed) == reference[0][3:]
    assert len(resumed) == len(reference[0])  # the offset applies to one iteration only
    resumed.set_epoch(1)
    assert list(resumed) == reference[1]

    # Across an epoch boundary with carry-over: stop 2 batches into epoch 2, resume, finish it.
    s = DistributedBucketBatchSampler(keys, **kw)
    for e in range(2):
        s.set_epoch(e)
        list(s)
    s.set_epoch(2)
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 2 and state["carry_in"]
    resumed = _resume_from(keys, state, **kw)
    resumed.set_epoch(2)  # the usual loop calls set_epoch(start_epoch): it keeps the offset
    assert list(resumed) == reference[2][2:]
    resumed.set_epoch(3)
    full.set_epoch(3)
    assert list(resumed) == list(full)

    # A state saved at the very end of an epoch resumes into the next one.
    s = DistributedBucketBatchSampler(keys, **kw)
    s.set_epoch(1)
    list(s)
    resumed = _resume_from(keys, s.state_dict(), **kw)
    assert list(resumed) == []
    resumed.set_epoch(2)
    assert list(resumed) == reference[2]


def test_resume_with_explicit_consumed_and_other_rank():
    """With prefetching the sampler runs ahead; the trainer passes what it really consumed."""
    keys = make_keys()
    s0 = DistributedBucketBatchSampler(keys, 2, 0, 2, seed=5)
    list(s0)  # ran to the end, training consumed only 4
    state = s0.state_dict(consumed=4)
    r1 = DistributedBucketBatchSampler(keys, 2, 1, 2, seed=5)
    expected = list(r1)[4:]
    resumed = _resume_from(keys, state, batch_size=2, rank=1, world_size=2, seed=5)
    assert list(resumed) == expected


def test_resume_on_fewer_ranks_keeping_the_global_batch():
    """2 ranks x batch 2 resumed as 1 rank x batch 4: the same global batches, in order."""
    keys = make_keys()
    ranks = [DistributedBucketBatchSampler(keys, 2, r, 2, seed=5) for r in (0, 1)]
    plans = [list(s) for s in ranks]
    state = json.loads(json.dumps(ranks[0].state_dict(consumed=3)))
    one = DistributedBucketBatchSampler(keys, 4, 0, 1, seed=5)
    one.load_state_dict(state)
    assert list(one) == [a + b for a, b in zip(plans[0][3:], plans[1][3:], strict=True)]


def test_resume_refuses_other_setup():
    keys = make_keys()
    state = json.loads(json.dumps(DistributedBucketBatchSampler(keys, 2, 0, 2, seed=5).state_dict()))
    with pytest.raises(ValueError, match="global batch is 2 x 2 x 1.*2 x 4 x 1"):
        DistributedBucketBatchSampler(keys, 2, 0, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        DistributedBucketBatchSampler(keys, 2, 0, 2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        DistributedBucketBatchSampler(keys[:-1], 2, 0, 2, seed=5).load_state_dict(state)
    s = DistributedBucketBatchSampler(keys, 2, 0, 2, seed=5)
    s.set_epoch(1)
    with pytest.raises(ValueError, match="consumed"):
        s.load_state_dict({**state, "consumed": 10**6})
    assert s.epoch == 1, "a refused state changes nothing"
    with pytest.raises(ValueError, match="version"):
        s.load_state_dict({**state, "version": 99})


def test_choose_identical_on_all_ranks():
    keys = make_keys()
    calls = []

    def recording_choose(rng, key, indices):
        calls.append(key)
        return choose(rng, key)

    ranks = samplers(keys, 4, batch_size=1, seed=9, choose=recording_choose)
    steps = run_epoch(ranks, 1)
    for step in steps:
        assert len({json.dumps(batch[0][1], sort_keys=True) for batch in step}) == 1
    assert len(calls) == 4 * len(steps)  # once per step per rank, nothing global


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2.0), "batch_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(rank=-1), "rank"),
        (dict(world_size=0), "world_size"),
        (dict(remainder="pad"), "remainder"),
        (dict(repeats=[1, 2]), "repeats"),
        (dict(repeats=-1), "repeats"),
        (dict(choose=5), "choose"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(bucket_keys=make_keys(), batch_size=2) | kwargs
    with pytest.raises(ValueError, match=match):
        DistributedBucketBatchSampler(**args)


def test_bad_keys_and_choose_results():
    with pytest.raises(ValueError, match="hashable"):
        DistributedBucketBatchSampler([("a",), ["b"]], 1)
    with pytest.raises(ValueError, match="dict"):
        list(DistributedBucketBatchSampler(make_keys(), 1, choose=lambda rng, key, indices: 3))
    for reserved in ("bucket", "epoch", "step"):
        with pytest.raises(ValueError, match=reserved):
            list(DistributedBucketBatchSampler(make_keys(), 1, choose=lambda rng, key, indices, r=reserved: {r: 1}))
    with pytest.raises(ValueError, match="epoch"):
        DistributedBucketBatchSampler(make_keys(), 1).set_epoch(-1)


class TinyDataset(Dataset):
    def __len__(self):
        return len(SIZES)

    def __getitem__(self, item):
        index, extras = item
        h, w = extras["bucket"][1:]
        return index, torch.zeros(3, h // 64, w // 64), extras["size"]


def collate(samples):
    assert len({x.shape for _, x, _ in samples}) == 1
    return [i for i, _, _ in samples], torch.stack([x for _, x, _ in samples]), samples[0][2]


def test_dataloader_with_workers_matches_sampler():
    keys = make_keys()
    s = DistributedBucketBatchSampler(keys, 3, 1, 2, seed=4, choose=choose)
    s.set_epoch(1)
    expected = list(s)
    loader = DataLoader(TinyDataset(), batch_sampler=s, num_workers=2, collate_fn=collate)
    assert len(loader) == len(expected)
    got = list(loader)
    assert [ids for ids, _, _ in got] == [[i for i, _ in b] for b in expected]
    assert [size for _, _, size in got] == [b[0][1]["size"] for b in expected]
    assert [tuple(x.shape[2:]) for _, x, _ in got] == [
        (b[0][1]["bucket"][1] // 64, b[0][1]["bucket"][2] // 64) for b in expected
    ]


def test_accumulation_matches_a_larger_batch_and_more_ranks():
    """Per optimizer step, the samples (and extras) are the same whether a global batch of 4 is
    1 rank x batch 4, 2 ranks x batch 2, or 1 rank x batch 1 x 4 micro-batches, or 2 x 1 x 2."""
    keys = make_keys()
    layouts = {(1, 4, 1), (2, 2, 1), (1, 1, 4), (2, 1, 2)}  # (world_size, batch_size, accumulation_steps)
    seen = {}
    for world_size, batch_size, accumulation in layouts:
        ranks = samplers(keys, world_size, batch_size, seed=5, choose=choose, accumulation_steps=accumulation)
        for s in ranks:
            s.set_epoch(1)
        per_rank = [list(s) for s in ranks]
        assert len(ranks[0]) == ranks[0].batches_per_epoch() * accumulation == len(per_rank[0])
        steps = []
        for step in range(ranks[0].batches_per_epoch()):
            micro = [per_rank[r][step * accumulation + m] for m in range(accumulation) for r in range(world_size)]
            assert all(len(b) == batch_size for b in micro)
            assert len({repr(extras) for b in micro for _, extras in b}) == 1  # one shape per step
            steps.append(([i for b in micro for i, _ in b], micro[0][0][1]))
        seen[(world_size, batch_size, accumulation)] = steps
    first, *rest = seen.values()
    assert all(steps == first for steps in rest)


def test_resume_with_accumulation():
    keys = make_keys()
    full = DistributedBucketBatchSampler(keys, 1, 1, 2, seed=9, accumulation_steps=3)
    full.set_epoch(2)
    expected = list(full)
    first = DistributedBucketBatchSampler(keys, 1, 1, 2, seed=9, accumulation_steps=3)
    first.set_epoch(2)
    assert first.batches_per_epoch() >= 4
    state = json.loads(json.dumps(first.state_dict(consumed=2)))  # 2 optimizer steps done
    resumed = DistributedBucketBatchSampler(keys, 1, 1, 2, seed=9, accumulation_steps=3)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[2 * 3 :]
    other = DistributedBucketBatchSampler(keys, 1, 1, 2, seed=9, accumulation_steps=1)
    with pytest.raises(ValueError, match="accumulation_steps"):
        other.load_state_dict(state)


def test_resume_through_a_dataloader_with_persistent_workers():
    """A DataLoader with workers calls iter() on the sampler twice before using it; the resume offset
    must survive that."""
    keys = make_keys()
    full = DistributedBucketBatchSampler(keys, 2, 0, 2, seed=4, choose=choose)
    full.set_epoch(1)
    expected = [[i for i, _ in b] for b in full]
    resumed = DistributedBucketBatchSampler(keys, 2, 0, 2, seed=4, choose=choose)
    resumed.load_state_dict({**full.state_dict(consumed=0), "consumed": 3})
    loader = DataLoader(
        TinyDataset(), batch_sampler=resumed, num_workers=1, persistent_workers=True, collate_fn=collate
    )
    assert [ids for ids, _, _ in loader] == expected[3:]
    resumed.set_epoch(1)  # the next pass over the same epoch is whole again
    assert [ids for ids, _, _ in loader] == expected
