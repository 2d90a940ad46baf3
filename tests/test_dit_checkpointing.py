"""Gradient checkpointing changes memory, never the numbers."""

import pytest
import torch

from wan import WanModel, dit_preset


def loss_and_grads(model: WanModel, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 4, 6, generator=gen)
    context = torch.randn(2, 11, 64, generator=gen)
    target = torch.randn(2, 16, 3, 4, 6, generator=gen)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x, torch.tensor([20.0, 870.0]), context), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_gives_the_same_gradients(every):
    torch.manual_seed(0)
    model = WanModel(**dict(dit_preset("debug"), num_layers=4))
    # The reference zero-inits the head, which would make every upstream gradient zero.
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model.train()
    loss_plain, grads_plain = loss_and_grads(model)
    model.set_gradient_checkpointing(True, every=every)
    assert model.checkpointed_blocks == set(range(0, 4, every))
    loss_ckpt, grads_ckpt = loss_and_grads(model)
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        assert grads_plain[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-6, atol=1e-9, msg=name)


def test_checkpointing_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        WanModel(**dit_preset("debug")).set_gradient_checkpointing(True, every=0)
