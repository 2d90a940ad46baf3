"""Distributed bucket batch sampler: one bucket (one shape) per global step, exact mid-epoch resume.

Every batch must have one shape, so samples are grouped by a hashable bucket key computed elsewhere
(e.g. ``("video", 480, 832)`` from the metadata width/height and the aspect table); the sampler never
looks inside a key. Design choices:

- One bucket per *global* step. The ``batch_size * world_size`` entries of a step all come from one
  bucket and share one extras dict (size, frame count, ...), so every rank runs the same shapes and
  steps take the same time on every rank (no rank idles at the gradient all-reduce waiting for a rank
  that drew 1024x1024 while it drew 512x512). Per-rank buckets would leave smaller remainders, but
  the wait would cost more than the remainders save.
- The epoch order is a pure function of (seed, epoch) -- and of the keys and arguments. Nothing is
  drawn from a global RNG stream: the plan comes from an RNG seeded by (seed, epoch) and each step's
  ``choose`` RNG is seeded by (seed, epoch, global batch index), so all ranks and all DataLoader
  workers agree, and resume needs no RNG state (spec: distributed-notes.md, "Exact resume").
- Remainders are carried over, not lost: a bucket's entries that do not fill a whole global batch are
  put at the front of that bucket's pool in the next epoch (so they are always in its first batch
  once the bucket fills one). A bucket smaller than one global batch keeps accumulating its carry
  until it fills one (with world_size 4 and batch 2, a 3-sample bucket is first trained in epoch 2,
  counting from 0): delayed, never lost; per bucket the carry stays below a global batch. The carried
  entries come on top of the next epoch's own copy of the same samples, so accounting is exact as
  multisets: yielded(e) + carry_out(e) = fresh(e) + carry_in(e). The fresh copies of carried samples
  are moved to the end of their bucket's pool, so they tend to become the next remainder (each sample
  then appears once per epoch) and never share a global batch with their carried copy unless the
  bucket fills only one batch; a sample can still appear twice in an epoch it is carried into.
  ``remainder="drop"`` instead discards remainders, like ``drop_last``.
- ``video_repeat`` is applied here through ``repeats`` (a per-sample count, e.g. ``video_repeat`` for
  videos and 1 for images), because the sampler is what knows how many entries an epoch has; the
  caller decides which samples are videos, since keys are opaque here.
- Ranks get disjoint slices of every global batch: rank r takes entries ``[r*B, (r+1)*B)``. As all
  ranks share one shape per step, tokens per rank are balanced by construction.
- Gradient accumulation is part of the plan: with ``accumulation_steps`` A, a global batch (one
  optimizer step) holds ``A * world_size * B`` entries of one bucket, and rank r's micro-batch m is
  entries ``[(m*W + r)*B, (m*W + r + 1)*B)``. So 1 rank with batch 2, 2 ranks with batch 1, and 1 rank
  with batch 1 accumulating 2 micro-batches train on the same samples at every optimizer step, and
  every micro-batch of a step has the step's shape.
- Each item's extras also carry "epoch" and "step" (the global batch index), so the dataset can seed
  its own per-sample draws (start frame, caption dropout) from (seed, epoch, step, sample index)
  instead of a worker's RNG stream, which would differ with the number of workers and on resume.

Example ``choose`` for ``training_with_video_token_length`` (helpers from ``train.data.buckets``)::

    def choose(rng, key, indices):
        size = rng.choice([512, 640, 768, 896, 1024])
        return {"size": size, "num_frames": 1 if key[0] == "image" else frames_for_token_budget(size, 512, 49)}
"""

import hashlib
import math
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

STATE_VERSION = 1
REMAINDER_POLICIES = ("carry", "drop")

Item = tuple[int, dict[str, Any]]  # (sample_index, extras), one per sample of a rank's batch
ChooseFn = Callable[[random.Random, Hashable, list[int]], dict[str, Any]]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from parts, stable across processes and Python versions.

    Python's ``hash()`` is salted per process (PYTHONHASHSEED), so it cannot be used: two ranks would
    disagree. ``str`` of ints is stable, and blake2b spreads nearby (seed, epoch) pairs apart.
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class DistributedBucketBatchSampler(Sampler[list[Item]]):
    """Yields this rank's batches, each a list of ``(sample_index, extras)`` from one bucket.

    Use as ``DataLoader(dataset, batch_sampler=sampler)``; the dataset's ``__getitem__`` then receives
    ``(sample_index, extras)`` tuples. ``extras`` is ``{"bucket": key, "epoch": e, "step": global batch
    index in the epoch, **choose(rng, key)}``, equal for
    every item of the global step on every rank (each item gets its own copy, so a dataset may mutate
    it). Call ``set_epoch(epoch)`` before each epoch, as with ``DistributedSampler``.

    Args:
        bucket_keys: one hashable bucket key per sample; samples with equal keys can share a batch.
        batch_size: samples per rank per micro-batch.
        accumulation_steps: micro-batches per optimizer step; each rank yields this many batches per
            global step (``len(sampler)`` counts micro-batches, ``batches_per_epoch()`` steps).
        rank, world_size: this rank among the data-parallel ranks. All ranks must pass the same keys,
            batch_size, world_size, seed, repeats, remainder and choose.
        seed: base seed of the plan and of the ``choose`` RNGs.
        shuffle: shuffle within buckets and the order of batches; False keeps dataset order (for
            evaluation and debugging), batches still grouped by bucket.
        remainder: "carry" (default) moves the entries that do not fill a global batch to the next
            epoch; "drop" discards them (like ``drop_last``), which loses different samples each epoch.
        repeats: entries per sample per epoch, an int for all or one int per sample (``video_repeat``
            for videos, 1 for images); 0 leaves a sample out.
        choose: per-step random choices, ``choose(rng, bucket_key, indices) -> dict`` (e.g. ``random_hw_adapt``
            size and ``training_with_video_token_length`` frame count; `indices` are the global batch's
            sample indices, for choices that depend on the clips' own sizes). It runs in the sampler with a
            ``random.Random`` seeded by (seed, epoch, global batch index); it must be deterministic
            given that RNG. It may not set the reserved keys "bucket", "epoch" and "step".
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        remainder: str = "carry",
        repeats: int | Sequence[int] = 1,
        choose: ChooseFn | None = None,
        accumulation_steps: int = 1,
    ):
        super().__init__()
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.accumulation_steps = _check_int("accumulation_steps", accumulation_steps, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size, got rank={rank} with world_size={world_size}")
        self.seed = _check_int("seed", seed, -(2**63))
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        self.remainder = remainder
        self.shuffle = bool(shuffle)
        if choose is not None and not callable(choose):
            raise ValueError(f"choose must be callable(rng, bucket_key) -> dict, got {type(choose).__name__}")
        self.choose = choose

        self.bucket_keys = list(bucket_keys)
        n = len(self.bucket_keys)
        if isinstance(repeats, int) and not isinstance(repeats, bool):
            self.repeats = [_check_int("repeats", repeats, 0)] * n
        else:
            self.repeats = [_check_int(f"repeats[{i}]", r, 0) for i, r in enumerate(repeats)]
            if len(self.repeats) != n:
                raise ValueError(f"repeats has {len(self.repeats)} entries but there are {n} bucket keys")

        # Buckets in order of first appearance: deterministic for a given key list, and unlike sorting
        # it works for keys of mixed types.
        self._bucket_ids: dict[Hashable, int] = {}
        self._sample_bucket: list[int] = []
        for i, key in enumerate(self.bucket_keys):
            try:
                bid = self._bucket_ids.setdefault(key, len(self._bucket_ids))
            except TypeError as e:
                raise ValueError(f"bucket key of sample {i} is not hashable: {key!r}") from e
            self._sample_bucket.append(bid)
        self._buckets = list(self._bucket_ids)
        # What the plan depends on besides the arguments, so a state from another dataset is refused.
        digest = hashlib.blake2b(repr((self._sample_bucket, self.repeats, self.shuffle)).encode(), digest_size=8)
        self._fingerprint = f"n={n} buckets={len(self._buckets)} layout={digest.hexdigest()}"

        # The current epoch, the carry into it, and its plan (list of global batches: (bucket id,
        # entries of all ranks)). The carry into epoch 0 is empty; later carries follow from the plans.
        self._epoch = 0
        self._carry_in: list[int] = []
        self._plan: list[tuple[int, list[int]]] | None = None
        self._carry_out: list[int] = []
        self._start = 0  # batches of this epoch to skip at the next __iter__ (set by load_state_dict)
        self._yielded = 0  # batches of this epoch handed out so far (counting the skipped ones)

    # --- plan -------------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulation_steps

    @property
    def epoch(self) -> int:
        return self._epoch

    def _make_plan(self, epoch: int, carry_in: list[int]) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """The global batches of an epoch and the entries it carries out, from (seed, epoch, carry_in)."""
        rng = random.Random(derive_seed("plan", self.seed, epoch))
        pools: list[list[int]] = [[] for _ in self._buckets]
        for i, r in enumerate(self.repeats):
            pools[self._sample_bucket[i]].extend([i] * r)
        carried: list[list[int]] = [[] for _ in self._buckets]
        for i in carry_in:
            carried[self._sample_bucket[i]].append(i)

        g = self.global_batch_size
        batches: list[tuple[int, list[int]]] = []
        carry_out: list[int] = []
        for bid, fresh in enumerate(pools):
            if self.shuffle:
                rng.shuffle(fresh)
            if carried[bid]:  # fresh copies of carried samples last: far from their carried copy
                twins = set(carried[bid])
                fresh = [i for i in fresh if i not in twins] + [i for i in fresh if i in twins]
            pool = carried[bid] + fresh  # carried first: they are always in the bucket's first batch
            full = len(pool) // g
            batches.extend((bid, pool[j * g : (j + 1) * g]) for j in range(full))
            if self.remainder == "carry":
                carry_out.extend(pool[full * g :])
        if self.shuffle:
            rng.shuffle(batches)
        return batches, carry_out

    def _ensure_plan(self) -> list[tuple[int, list[int]]]:
        if self._plan is None:
            self._plan, self._carry_out = self._make_plan(self._epoch, self._carry_in)
        return self._plan

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; the result depends only on (seed, epoch), not on call history.

        Its carry-in follows from the earlier epochs' plans, so a jump forward replays the plans in
        between and a jump backward replays from epoch 0 (a plan is one shuffle of the indices, about
        0.7 s per epoch for a million samples; the usual one-epoch-at-a-time loop builds each once).
        Moving to another epoch forgets a pending resume offset; setting the current epoch keeps it.
        """
        epoch = _check_int("epoch", epoch, 0)
        if epoch == self._epoch:
            return
        if epoch < self._epoch:
            self._epoch, self._carry_in, self._plan = 0, [], None
        while self._epoch < epoch:
            self._ensure_plan()
            self._epoch, self._carry_in, self._plan = self._epoch + 1, self._carry_out, None
        self._start = self._yielded = 0

    def batches_per_epoch(self) -> int:
        """Steps in the whole current epoch (the same on every rank)."""
        return len(self._ensure_plan())

    def __len__(self) -> int:
        """Micro-batches the next iteration yields: the current epoch minus a resumed offset."""
        return (self.batches_per_epoch() - self._start) * self.accumulation_steps

    def global_batches(self) -> list[tuple[Hashable, list[int]]]:
        """The current epoch's plan: (bucket key, sample indices of the global batch in (micro-batch, rank)
        order) per step."""
        return [(self._buckets[bid], list(entries)) for bid, entries in self._ensure_plan()]

    def carry_out(self) -> list[int]:
        """Sample indices this epoch carries into the next (empty with remainder="drop")."""
        self._ensure_plan()
        return list(self._carry_out)

    def extras(self, step: int) -> dict[str, Any]:
        """The extras of global step `step` of the current epoch: bucket, epoch, step and choose's dict."""
        plan = self._ensure_plan()
        if not 0 <= step < len(plan):
            raise ValueError(f"step {step} is outside epoch {self._epoch}, which has {len(plan)} steps")
        key = self._buckets[plan[step][0]]
        extras: dict[str, Any] = {"bucket": key, "epoch": self._epoch, "step": step}
        if self.choose is not None:
            rng = random.Random(derive_seed("choose", self.seed, self._epoch, step))
            chosen = self.choose(rng, key, list(plan[step][1]))
            if not isinstance(chosen, dict):
                raise ValueError(f"choose must return a dict, got {type(chosen).__name__} {chosen!r}")
            reserved = sorted(set(chosen) & set(extras))
            if reserved:
                raise ValueError(f"choose may not set {reserved}: the sampler sets bucket, epoch and step itself")
            extras.update(chosen)
        return extras

    def __iter__(self) -> Iterator[list[Item]]:
        # A resume offset applies to one iteration only: the first one that yields a batch. It is taken
        # at the first next(), not at iter(): a DataLoader with workers makes a sampler iterator that it
        # never advances, then the one it uses (taking the offset at iter() lost it on resume).
        plan = self._ensure_plan()
        start, self._start = self._start, 0
        self._yielded = start
        for step in range(start, len(plan)):
            extras = self.extras(step)
            self._yielded = step + 1
            for micro in range(self.accumulation_steps):
                lo = (micro * self.world_size + self.rank) * self.batch_size
                yield [(i, dict(extras)) for i in plan[step][1][lo : lo + self.batch_size]]

    # --- resume -----------------------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position as plain JSON types: epoch, batches of it consumed, carry into it, and checks.

        With DataLoader workers the sampler runs ahead of training by the prefetched batches, so pass
        `consumed` = the global (optimizer) steps of this epoch the training loop completed; by default
        it is the number the sampler has handed out. The state holds no rank and is equal on every rank (the
        plan is global), so any rank's copy resumes every rank; DCP's deduplication of equal keys
        across ranks is harmless here.
        """
        consumed = self._yielded if consumed is None else _check_int("consumed", consumed, 0)
        if consumed > self.batches_per_epoch():
            raise ValueError(
                f"consumed={consumed} exceeds the {self.batches_per_epoch()} batches of epoch {self._epoch}"
            )
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "consumed": consumed,
            "carry_in": list(self._carry_in),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "accumulation_steps": self.accumulation_steps,
            "remainder": self.remainder,
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue mid-epoch: the next ``__iter__`` yields exactly the batches an uninterrupted run would.

        The rank and world size may differ (the plan is global) as long as the global batch does; seed, remainder policy
        and the keys/repeats must match: another global batch size would make another plan. Do not
        call ``set_epoch`` with another epoch before iterating, or the offset is forgotten.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown sampler state version {state.get('version')!r}, expected {STATE_VERSION}")
        for name in ("seed", "remainder", "fingerprint"):
            mine = getattr(self, "_" + name if name == "fingerprint" else name)
            if state.get(name) != mine:
                raise ValueError(f"sampler state has {name}={state.get(name)!r} but this sampler has {mine!r}")
        # The plan depends on the global batch only, so a run may resume on another number of ranks
        # (or micro-batch, or accumulation) that keeps it: every sample keeps its global position.
        shape = [state.get("batch_size"), state.get("world_size"), state.get("accumulation_steps", 1)]
        saved = math.prod(shape) if all(isinstance(v, int) for v in shape) else None
        if saved != self.global_batch_size:
            raise ValueError(
                f"the checkpoint's global batch is {' x '.join(map(str, shape))} (batch x ranks x accumulation), "
                f"this run's {self.batch_size} x {self.world_size} x {self.accumulation_steps}: keep the product"
                f"{f' ({saved})' if saved else ''} equal, e.g. with train_batch_size or gradient_accumulation_steps"
            )
        carry = [_check_int("carry_in entry", i, 0) for i in state["carry_in"]]
        if any(i >= len(self.bucket_keys) for i in carry):
            raise ValueError(f"carry_in holds sample indices >= {len(self.bucket_keys)}")
        epoch = _check_int("epoch", state["epoch"], 0)
        consumed = _check_int("consumed", state["consumed"], 0)
        plan, carry_out = self._make_plan(epoch, carry)  # checked before anything changes
        if consumed > len(plan):
            raise ValueError(f"consumed={consumed} exceeds the {len(plan)} batches of epoch {epoch}")
        self._epoch, self._carry_in, self._plan, self._carry_out = epoch, carry, plan, carry_out
        self._start = self._yielded = consumed
