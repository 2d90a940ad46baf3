"""train/ema.py in one process: the warmup schedule against diffusers' EMAModel (the reference VideoX-Fun's
--use_ema uses), the swap in and back, and the average saved by N ranks read back by M ranks and whole
(tools/zero_to_bf16.py --ema)."""

import torch
from diffusers.training_utils import EMAModel

from train.ema import EMA, EMAConfig, ema_sources
from train.engines.base import even_fragments


class Weights:
    """What the EMA asks of an engine, over plain tensors: rank `rank` of `world` holds an even piece of
    each (as the DDP engine does)."""

    def __init__(self, tensors: dict[str, torch.Tensor], rank: int = 0, world: int = 1):
        self.tensors, self.rank, self.world = tensors, rank, world
        self.refreshed = 0

    def trainable_fragments(self):
        return even_fragments(self.tensors, self.rank, self.world)

    def refresh_from_fragments(self):
        self.refreshed += 1


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 5, generator=g), "b.bias": torch.randn(11, generator=g)}


def test_warmup_is_diffusers_ema_model():
    weights = random_weights(0)
    params = [torch.nn.Parameter(t.clone()) for t in weights.values()]
    reference = EMAModel(params, decay=0.5)  # VideoX-Fun's EMAModel(...): the default ramp (1 + n) / (10 + n)
    ema = EMA(EMAConfig(enabled=True, decay=0.5, warmup=True), Weights(weights), 0, 1)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 31):
        with torch.no_grad():
            for name, p in zip(weights, params, strict=True):
                p.add_(torch.randn(p.shape, generator=g))
                weights[name].copy_(p)
        ema.after_step(step, updated=True)
        reference.step(params)
    for shadow, expected in zip(ema.shadow, reference.shadow_params, strict=True):
        torch.testing.assert_close(shadow.view(expected.shape), expected, rtol=0, atol=1e-6)
    assert ema.averages == 30


def test_skipped_updates_and_the_schedule():
    weights = random_weights(2)
    ema = EMA(EMAConfig(enabled=True, decay=0.9, start_step=2, update_every=3), Weights(weights), 0, 1)
    history = []
    for step in range(1, 12):
        for t in weights.values():
            t.add_(1.0)
        ema.after_step(step, updated=step != 8)  # step 8's update was skipped: its weights are not folded in
        history.append(ema.shadow[1].clone())
    b = {s: random_weights(2)["b.bias"] + s for s in range(12)}
    expected = b[2]  # steps 1 and 2 copy
    for s in (5, 11):  # (s - 2) % 3 == 0 and applied; 8 was skipped
        expected = 0.9 * expected + 0.1 * b[s]
    torch.testing.assert_close(history[-1], expected, rtol=0, atol=1e-6)
    assert ema.averages == 2


def test_swapped_puts_the_average_in_and_the_weights_back():
    weights = random_weights(3)
    before = {n: t.clone() for n, t in weights.items()}
    engine = Weights(weights)
    ema = EMA(EMAConfig(enabled=True, decay=0.5), engine, 0, 1)
    for t in weights.values():
        t.mul_(3.0)
    trained = {n: t.clone() for n, t in weights.items()}
    ema.after_step(1, updated=True)  # the average: (before + trained) / 2
    with ema.swapped():
        for name, t in weights.items():
            torch.testing.assert_close(t, (before[name] + trained[name]) / 2, rtol=0, atol=1e-6)
    assert all(torch.equal(weights[n], trained[n]) for n in weights) and engine.refreshed == 2


def test_saved_by_two_ranks_read_by_three_and_whole(tmp_path):
    weights = random_weights(4)
    for rank in range(2):
        ema = EMA(EMAConfig(enabled=True), Weights(weights, rank, 2), rank, 2)
        ema.averages = 5
        ema.save(tmp_path)
    whole = {name: source.read() for name, source in ema_sources(tmp_path).items()}
    assert all(torch.equal(whole[n], weights[n]) for n in weights)
    for rank in range(3):
        other = {n: torch.zeros_like(t) for n, t in weights.items()}
        ema = EMA(EMAConfig(enabled=True), Weights(other, rank, 3), rank, 3)
        ema.load(tmp_path)
        assert ema.averages == 5
        for fragment, shadow in zip(ema.fragments, ema.shadow, strict=True):
            flat = weights[fragment.name].view(-1)
            assert torch.equal(shadow, flat[fragment.offset : fragment.offset + shadow.numel()])
