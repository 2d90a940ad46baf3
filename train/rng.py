"""Every RNG a training process draws from, as JSON values: saved per rank with each checkpoint so a
resumed run continues bit for bit (python, numpy, torch CPU and, when present, CUDA)."""

import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_state() -> dict:
    """This process's python, numpy, torch CPU and (when available) CUDA RNG states, as JSON types."""
    version, mt_state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Set every RNG captured by capture_rng_state. Call it last on resume, after the model,
    optimizer and data loader are restored, since building those may draw random numbers."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count != len(cuda):
            log.warning(
                "the checkpoint holds CUDA RNG states of %d devices, this process sees %d: restoring the first %d, "
                "the run will not continue bitwise",
                len(cuda),
                count,
                min(count, len(cuda)),
            )
        for device, s in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), device)
    elif cuda:
        log.warning("the checkpoint holds CUDA RNG states but CUDA is not available: they are ignored")


class RNGState:
    """This process's RNG states as a per-rank checkpoint part (restored last: register it last)."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
            raise ValueError("not an RNG state (needs python, numpy and torch)")
        restore_rng_state(state)
