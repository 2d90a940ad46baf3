"""Ulysses sequence parallelism in the DiT (wan/modules/ulysses.py): the debug DiT split over 2 gloo
ranks gives the whole model's output, and its gradients once the ranks' shares are summed, for an even
token count, one that needs padding, i2v, full and selective checkpointing, and Wan2.2 TI2V's per-token
timesteps (ulysses_worker.py)."""

from pathlib import Path

import pytest
import torch
from ranks import gloo_worker_results

from wan import WanModel, dit_preset
from wan.modules.ulysses import SequenceParallel

WORKER = Path(__file__).with_name("ulysses_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ulysses")
    ranks = gloo_worker_results(WORKER, out)
    assert ranks[0].keys() == ranks[1].keys()
    return ranks


CASES = ["t2v", "odd_tokens", "i2v", "full_checkpointing", "selective_checkpointing", "ti2v_per_token"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_split_over_two_ranks_equals_the_whole_model(results, case):
    for rank in (0, 1):
        found = results[rank][case]
        print(case, rank, found)
        assert found["out"] <= 1e-6 and found["grads"] <= 1e-6, found
        measured, analytic = found["all_to_all_bytes"]
        assert measured == analytic, found


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_each_rank_saves_about_half_the_activations(results, mode):
    """A block's saved activations are per token, but for cross-attention's text keys and values (whole
    on every rank; 8 text rows here)."""
    for rank in (0, 1):
        whole, split = results[rank][f"memory_{mode}"]["saved_bytes"]
        print(mode, rank, whole, split, split / whole)
        assert 0.45 <= split / whole <= 0.55, (whole, split)


@pytest.mark.slow
def test_sampling_split_over_two_ranks_gives_the_whole_models_videos(results):
    """What validation runs (wan.pipeline.generate: UniPC, batched guidance, the VAE decode), t2v and
    i2v; 9 frames of 48 x 80 are 3 latent frames of 3 x 5 tokens: 45, padded to 46."""
    for rank in (0, 1):
        found = results[rank]["sampling"]
        print(rank, found)
        assert found["normal"] <= 1e-5 and found["i2v"] <= 1e-5, found
        assert found["normal_exchanged"] > 0 and found["i2v_exchanged"] > 0  # split indeed


class FakeGroupOfThree(SequenceParallel):
    def __init__(self):  # no process group: only check_heads is used
        self.size, self.rank, self.num_tokens = 3, 0, 0


def test_heads_that_do_not_divide_are_refused():
    model_cfg = dict(dit_preset("debug"), num_layers=1)
    with torch.device("meta"):
        model = WanModel(**model_cfg)
    with pytest.raises(ValueError, match="heads divisible by it, not 4"):
        model.set_sequence_parallel(FakeGroupOfThree())
