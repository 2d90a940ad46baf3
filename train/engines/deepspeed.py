"""DeepSpeed ZeRO-2 ("zero2") and ZeRO-3 ("zero3") behind the engine interface of train/engines/base.py.

ZeRO-2: every rank holds the whole module (bf16 or fp32); gradients and the fp32 master weights with
their AdamW state are partitioned across ranks. ZeRO-3: parameters are partitioned too, from
construction on (`deepspeed.zero.Init`): no rank ever holds the whole DiT, the starting weights arrive
one module at a time from rank 0.

The optimizer is our torch AdamW (`build_optimizer`), handed to `deepspeed.initialize`; ZeRO wraps it
and steps it on its fp32 partitions. The lr schedule is ours too (`build_schedule` on that AdamW): its
param_groups are the ones ZeRO's update reads the lr from, so DeepSpeed gets no scheduler of its own.

Precision: with bf16 the module (and so every forward) is bf16 and WanModel opens autocast itself;
DeepSpeed keeps fp32 master partitions, which we set to the float32 starting weights (DeepSpeed would
derive them from the bf16 copy), and reduces gradients in fp32 (communication_data_type); gradient
partitions are bf16 (DeepSpeed's default grad_accum_dtype). With fp32 everything is fp32. fp16 (CUDA
only: DeepSpeed's CPU accelerator has no fp16, see train.engines.base.check_mixed_precision) is bf16's layout
in fp16 plus DeepSpeed's dynamic loss scaler, set to torch GradScaler's rule as the ddp and fsdp
engines use it (start 2**16, halve on every overflow, double after 2000 clean steps), so an overflow
skips the step on every engine alike.

Checkpoints are DeepSpeed's own files (pickles) under `folder/deepspeed/`, plus `folder/scheduler.json`:

    deepspeed/mp_rank_00_model_states.pt                    ZeRO-2, rank 0: module weights, engine counters
    deepspeed/zero_pp_rank_{r}_mp_rank_00_model_states.pt   ZeRO-3, rank r: its module state
    deepspeed/[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   rank r: fp32 master + AdamW partitions

They are tied to the world size (the partitioning): another world size goes through a consolidated
export (tools/zero_to_bf16.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from train.checkpoint_io import read_json, write_json
from train.distributed import ParallelLayout
from train.engines.base import (
    SCHEDULER_FILE,
    EngineSetup,
    EngineTraits,
    Fragment,
    ModelStates,
    StepResult,
    advance_schedule,
    apply_offloads,
    build_optimizer,
    build_schedule,
    check_mixed_precision,
    held_bytes,
    restore_schedule,
)
from train.engines.deepspeed_config import STAGES, generated_config, merge_override, read_override
from train.engines.deepspeed_reader import TAG, read_zero2, read_zero3
from wan import WanModel
from wan.modules.state_dict_io import assign_tensor, prepare_tensor

if TYPE_CHECKING:
    from train.config import RunConfig
    from train.models import DiTRecipe


# DeepSpeed copies these recovery scripts next to every ZeRO checkpoint; we remove them (nobody would
# claim them in the checkpoint's file list, and tools/zero_to_bf16.py does their job).
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
_RANK_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_")


# ----------------------------------------------------------------------------------------------------
# Configuration (the dict itself: train/engines/deepspeed_config.py)


def checked_config(setup: EngineSetup, world_size: int) -> dict:
    """generated_config, refused (ValueError) when this engine cannot run its precision on the device."""
    config = generated_config(setup, world_size)
    check_mixed_precision(setup.mixed_precision, TRAITS[setup.parallel.engine], setup.device)
    return config


def deepspeed_config(setup: EngineSetup, world_size: int, report: Callable[[str], None] | None = None) -> dict:
    """The DeepSpeed config dict for `setup` on `world_size` ranks: ours, with the values of the
    [parallel] deepspeed_config JSON file (if any) deep-merged over it. Each value the file changes is
    passed to `report` as `deepspeed_config FILE: key.path: ours -> theirs`."""
    config = checked_config(setup, world_size)
    source = setup.parallel.deepspeed_config
    if source:
        for line in merge_override(config, read_override(source), source):
            if report is not None:
                report(line)
    return config


# ----------------------------------------------------------------------------------------------------
# The engine


# torch's deprecation notices for the collectives DeepSpeed calls (all_gather_into_tensor,
# reduce_scatter_tensor): printed again and again in every run, and nothing a user can act on.
_DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def prepare_deepspeed(device: torch.device) -> None:
    """What every process does before DeepSpeed's communication starts (deepspeed.init_distributed or
    deepspeed.initialize): silence the deprecation notices of the collectives DeepSpeed calls and, on
    CPU, skip DeepSpeed's shared-memory op.

    On the CPU accelerator deepspeed.init_distributed JIT-compiles `deepspeed_shm_comm` (~80 s, into the
    torch-extensions folder shared by every checkout and environment, so it is rebuilt whenever another
    one built it there). Only `inference_all_reduce` (tensor-parallel inference) uses it; training
    collectives go through torch.distributed. DeepSpeed builds an op only when its entry in
    `deepspeed.ops.__compatible_ops__` (probed once per process, then kept) is true."""
    import warnings

    import deepspeed

    warnings.filterwarnings("ignore", message=_DEPRECATED_COLLECTIVES, category=FutureWarning)
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(device: torch.device) -> None:
    """DeepSpeed's communication layer over the trainer's process group (which DeepSpeed reuses when
    torch.distributed is already initialised, as it is in the trainer); a single process otherwise,
    on MASTER_PORT if set, else on a free port (a fixed one would collide with a second such run)."""
    import deepspeed

    prepare_deepspeed(device)
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def load_weights_only(path: str, map_location=None) -> Any:
    """torch.load(weights_only=True) of a DeepSpeed checkpoint file: tensors, containers and plain
    values, plus the few data classes DeepSpeed pickles into its optimizer files (a loss-scaler record,
    static or, under fp16, dynamic; the ZeRO stage enum; fragment addresses); anything else is refused,
    never run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2 ("zero2") or ZeRO-3 ("zero3"): see the module docstring."""

    def __init__(self, recipe: DiTRecipe, setup: EngineSetup):
        import deepspeed

        self.setup = setup
        self.stage = STAGES[setup.parallel.engine]
        # A LoRA run saves its adapter only; the frozen base is rebuilt from the base model at resume.
        self.adapter_only = recipe.lora is not None
        _init_distributed(setup.device)
        rank, world = self.setup.layout.rank, self.setup.layout.world_size
        self.config = deepspeed_config(
            setup, world, report=(lambda line: print(line, flush=True)) if rank == 0 else None
        )
        fp16 = self.config["fp16"].get("enabled")
        self.dtype = torch.bfloat16 if self.config["bf16"].get("enabled") else torch.float16 if fp16 else torch.float32

        module = self._build_zero3(recipe) if self.stage == 3 else self._build_whole(recipe)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # With offload_optimizer the fp32 partitions the AdamW steps live on the host: a CPU optimizer.
        offload = "offload_optimizer" in self.config["zero_optimization"]
        self.torch_optimizer = build_optimizer(
            params, setup.optim, torch.device("cpu") if offload else setup.device, recipe.is_low_lr
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=self.torch_optimizer, lr_scheduler=None, config=self.config
        )
        self.module: nn.Module = self.engine.module
        check_rope_tables(self.module)
        if self.dtype != torch.float32:
            self._set_fp32_master(recipe)
        recipe.weights.release()
        # ZeRO steps the AdamW we handed in on its own fp32 partitions, reading lr from these very
        # param_groups: a schedule on the torch optimizer drives ZeRO's update.
        self.scheduler = build_schedule(self.torch_optimizer, setup)
        self._step_bytes = {"grads": 0, "buffers": 0}

    def _build_whole(self, recipe: DiTRecipe) -> WanModel:
        """ZeRO-2: the whole DiT on every rank, in the module dtype from the start (recipe.materialize
        would build it in float32 first: twice the device memory until DeepSpeed casts it)."""
        model = recipe.build()
        for name, tensor in recipe.named_tensors(model):
            assign_tensor(model, name, prepare_tensor(tensor, self.dtype, self.setup.device))
        model.rope.reset_tables(self.setup.device)
        return model

    @torch.no_grad()
    def _set_fp32_master(self, recipe: DiTRecipe) -> None:
        """bf16 / fp16: DeepSpeed derives its fp32 master partitions from the low-precision parameters,
        i.e. from the starting weights rounded. Set them to the float32 starting weights (as DDP and FSDP
        start): rank 0 reads each trainable tensor and broadcasts it, each rank keeps its partition."""
        from deepspeed.utils import safe_set_full_fp32_param

        device, rank0 = self.setup.device, self.setup.layout.rank == 0
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
            if rank0:
                value = prepare_tensor(recipe.weights.read(name), torch.float32, device)
            else:
                value = torch.empty(shape, dtype=torch.float32, device=device)
            if dist.is_initialized():
                dist.broadcast(value, 0)
            if hasattr(param, "ds_tensor"):
                # ZeRO-3 cuts each rank's slice at rank * partition size of a flat, padded buffer.
                padded = torch.zeros(
                    param.ds_tensor.ds_numel * self.setup.layout.world_size, dtype=torch.float32, device=device
                )
                padded[: value.numel()] = value.reshape(-1)
                value = padded
            safe_set_full_fp32_param(param, value)

    def _build_zero3(self, recipe: DiTRecipe) -> WanModel:
        """The DiT partitioned from the start: built inside zero.Init (each submodule's parameters are
        partitioned as soon as its __init__ returns), then loaded one module at a time from rank 0."""
        import deepspeed

        meta = recipe.build()  # checks the weights folder, chooses the trainable parameters
        offload_param = "offload_param" in self.config["zero_optimization"]
        # No dtype argument: deepspeed 0.19.8 ignores it on accelerators without fp16 (the CPU one picks
        # bf16 whatever is passed, an operator-precedence slip); without it the dtype comes from the
        # config's bf16 flag. Checked below.
        init = deepspeed.zero.Init(config_dict_or_path=self.config, remote_device="cpu" if offload_param else None)
        # WanModel.__init__ ends with init_weights() unless built on meta; under zero.Init the
        # submodules are partitioned by then (size-0 parameters), and the weights get replaced below
        # anyway: skip it. (Each nn.Linear still runs its own default init once before partitioning.)
        skip_init = _SkipInitWeights()
        with init, skip_init:
            model = WanModel(**recipe.config)
            if recipe.lora is not None:  # the adapters built (and partitioned) like the rest
                recipe.apply_lora(model)
        wrong = {str(p.dtype) for p in model.parameters() if p.dtype != self.dtype}
        if wrong:
            raise RuntimeError(
                f"deepspeed.zero.Init built {', '.join(sorted(wrong))} parameters, expected {self.dtype}"
            )
        trainable = dict(meta.named_parameters())
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name].requires_grad)
        model.set_gradient_checkpointing(**meta.gradient_checkpointing_settings)
        model.set_sequence_parallel(meta.sequence_parallel)
        del meta
        apply_selective_leaf_blocks(model)

        rank0 = self.setup.layout.rank == 0
        with torch.no_grad():
            for prefix, mod in model.named_modules():
                own = list(mod.named_parameters(recurse=False))
                if own:
                    # Gathered on every rank (one module's worth), filled on rank 0, broadcast on exit.
                    with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
                        if rank0:
                            for name, param in own:
                                param.data.copy_(recipe.weights.read(_join(prefix, name)))
                for name, buf in mod.named_buffers(recurse=False):
                    if name not in mod._non_persistent_buffers_set:  # buffers are whole on every rank
                        buf.copy_(recipe.weights.read(_join(prefix, name)))
        # zero.Init creates every float tensor in its dtype, the RoPE tables included (bf16 tables
        # would round the angles): rebuild them in float32 outside it.
        model.rope.reset_tables(self.setup.device)
        check_rope_tables(model)
        return model

    # ------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> torch.Tensor:
        # bf16: the module's weights are bf16, so WanModel opens autocast itself (keeping its float32
        # regions); fp32: nothing to do.
        return self.engine(*args, **kwargs)

    @torch.no_grad()
    def inference_forward(self, *args, **kwargs) -> torch.Tensor:
        # The module, past the engine's training bookkeeping; under zero3 its hooks gather each
        # module's parameters from every rank, so this is a collective there.
        return self.engine.module(*args, **kwargs)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        # We own the accumulation boundary (DeepSpeed's micro-step counter would otherwise expect an
        # engine.step() after every micro-batch): gradients are reduced into the partitions every
        # micro-step under ZeRO-2/3 and the update happens in step() after the last one.
        self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward divides by gradient_accumulation_steps itself: no division here.
        self.engine.backward(loss)

    def step(self) -> StepResult:
        """The update (DeepSpeed clips to gradient_clipping and skips it, on every rank alike, when
        the global gradient norm is not finite), then the lr schedule advances, also after a skip."""
        lr = float(self.torch_optimizer.param_groups[0]["lr"])
        self._step_bytes = self._held_step_bytes()  # the step frees the gradients
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        updated = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else float(norm)
        if not updated and math.isfinite(norm):
            norm = math.inf  # DeepSpeed reports inf for a skipped step; keep the contract if it changes
        advance_schedule(self.scheduler)
        return StepResult(norm, updated, lr)

    # ------------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> list[str]:
        """Collective. DeepSpeed writes under folder/deepspeed/ (see the module docstring), rank 0 also
        scheduler.json. Returns this rank's files relative to `folder`, each fsynced: the files named
        *zero_pp_rank_{r}_* belong to rank r, the rest (ZeRO-2's mp_rank_00_model_states.pt) to rank 0."""
        folder = Path(folder)
        rank = self.setup.layout.rank
        # save_latest=False: no `latest` file (a tag pointer nobody would claim); the fixed tag is the
        # sub-folder. save_checkpoint ends with a barrier: every rank's files are complete on return.
        self.engine.save_checkpoint(
            str(folder), tag=TAG, client_state={}, save_latest=False, exclude_frozen_parameters=self.adapter_only
        )
        mine = [f"{TAG}/{name}" for name in sorted(os.listdir(folder / TAG)) if _file_owner(name) == rank]
        for name in mine:
            with open(folder / name, "rb") as f:  # DeepSpeed does not fsync what it writes
                os.fsync(f.fileno())
        if rank == 0:
            for script in _RECOVERY_SCRIPTS:
                (folder / script).unlink(missing_ok=True)
            for path in (folder / TAG, folder):  # the new entries (all ranks' files exist by now)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            write_json(folder / SCHEDULER_FILE, self.scheduler.state_dict())
            mine.append(SCHEDULER_FILE)
        if dist.is_initialized():
            dist.barrier()  # nobody reports a folder that rank 0 is still tidying
        return mine

    def load(self, folder: Path) -> None:
        """Resume from `folder`, saved by this engine with the same precision and world size (anything
        else is refused with a ValueError naming the file). Call it on a freshly built engine: DeepSpeed
        loads a ZeRO-3 checkpoint only into a model that has not run yet.

        DeepSpeed 0.19.8 reads its files with a blanket unpickle (weights_only off)
        (checkpoint_engine/torch_checkpoint_engine.py). Every file of this load path goes through the
        engine's checkpoint_engine.load, which we replace by a weights_only=True load that allows just the
        three DeepSpeed data classes its files hold (see `load_weights_only`)."""
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        folder = Path(folder)
        self.check_checkpoint(folder)
        self.engine.checkpoint_engine.load = load_weights_only
        try:
            path, _ = self.engine.load_checkpoint(
                str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
                load_module_strict=not self.adapter_only,
            )  # fmt: skip
        except (AssertionError, FileNotFoundError, RuntimeError, ZeRORuntimeException, pickle.UnpicklingError) as err:
            raise ValueError(f"{folder / TAG}: DeepSpeed could not load this checkpoint: {err}") from err
        if path is None:
            raise ValueError(f"{folder / TAG}: DeepSpeed found no checkpoint to load")
        # ZeRO updates with these very param groups: whatever DeepSpeed restored into them, the next
        # update's lr and AdamW values are the config's at the checkpoint's schedule position.
        restore_schedule(self.torch_optimizer, self.scheduler, read_json(folder / SCHEDULER_FILE), self.setup.optim)

    def expected_files(self) -> list[str]:
        """The DeepSpeed files (relative to the checkpoint folder) a save by this engine writes, all ranks."""
        optim = "bf16_" if self.dtype == torch.bfloat16 else ""
        files = [] if self.stage == 3 else [f"{TAG}/mp_rank_00_model_states.pt"]
        for r in range(self.setup.layout.world_size):
            if self.stage == 3:
                files.append(f"{TAG}/zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            files.append(f"{TAG}/{optim}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        return files

    def check_checkpoint(self, folder: Path) -> None:
        """Refuse (ValueError naming the file and what to do) a checkpoint folder whose DeepSpeed files
        are not exactly the ones this engine, precision and world size would write; DeepSpeed itself
        would fail with an assertion, a FileNotFoundError or, worse, load a mismatched state."""
        folder = Path(folder)
        world = self.setup.layout.world_size
        ds = folder / TAG
        present = sorted(f"{TAG}/{n}" for n in os.listdir(ds)) if ds.is_dir() else []
        expected = self.expected_files()
        if not (folder / SCHEDULER_FILE).is_file():
            raise ValueError(f"{folder / SCHEDULER_FILE}: missing from the checkpoint")
        extra_ranks = sorted({_file_owner(f) for f in present if _RANK_FILE_RE.search(f) and _file_owner(f) >= world})
        missing = [f for f in expected if f not in present]
        if not missing and not extra_ranks:
            return
        what = f"engine {self.setup.parallel.engine}, mixed_precision {self.setup.mixed_precision}, {world} ranks"
        if not present:
            raise ValueError(
                f"{ds}: no DeepSpeed checkpoint files (not written by a zero2/zero3 run?); this run ({what}) "
                "cannot resume from it"
            )
        if extra_ranks:
            raise ValueError(
                f"{ds}: holds files of rank {extra_ranks[-1]} (zero_pp_rank_{extra_ranks[-1]}_*), so it was saved by "
                f"more than the {world} ranks of this run: ZeRO checkpoints are tied to the world size. Resume with "
                "the world size that saved it, or export the weights (tools/zero_to_bf16.py) and start a new run"
            )
        layout = "zero3" if any(f.endswith("_model_states.pt") and "zero_pp_rank_" in f for f in present) else "zero2"
        saved_bf16 = any(Path(f).name.startswith("bf16_") for f in present)
        if layout != self.setup.parallel.engine or saved_bf16 != (self.dtype == torch.bfloat16):
            raise ValueError(
                f"{ds}: saved by a {layout} run with mixed_precision {'bf16' if saved_bf16 else 'fp32 or fp16'}; this run is "
                f"{what}. Resume with the same engine and precision, or export the weights (tools/zero_to_bf16.py) "
                "and start a new run from them"
            )
        raise ValueError(
            f"{folder / missing[0]}: missing from the checkpoint (missing: {', '.join(missing)}). Either the save "
            f"was incomplete or the folder was copied partially (resume from another checkpoint), or it was saved "
            f"by fewer than the {world} ranks of this run (resume with that world size)"
        )

    # ------------------------------------------------------------------------------------------------
    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective (every rank must iterate to the end, in the same order): (official name, full CPU
        tensor) for every parameter and persistent buffer, in state_dict order. Trainable parameters
        come as the float32 master weights, frozen ones as the module holds them (bf16 under bf16);
        under zero3 one module is gathered at a time."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        for prefix, mod in self.module.named_modules():
            own = list(mod.named_parameters(recurse=False))
            out: list[tuple[str, torch.Tensor]] = []
            frozen = [p for _, p in own if not p.requires_grad]
            # Gather only the frozen ones (trainable ones come from the fp32 partitions), and leave the
            # context before yielding: a consumer that stops early must not leave ranks mid-collective.
            with deepspeed.zero.GatheredParameters(frozen, enabled=self.stage == 3 and bool(frozen)):
                for name, param in own:
                    if param.requires_grad:
                        full = safe_get_full_fp32_param(param)
                        if full is None:
                            raise RuntimeError(f"DeepSpeed holds no fp32 master weight for {_join(prefix, name)}")
                        out.append((_join(prefix, name), full.detach().to("cpu", copy=True)))
                    else:
                        out.append((_join(prefix, name), param.detach().to("cpu", copy=True)))
            for name, buf in mod.named_buffers(recurse=False):
                if name not in mod._non_persistent_buffers_set:
                    out.append((_join(prefix, name), buf.detach().to("cpu", copy=True)))
            yield from out

    def trainable_fragments(self) -> list[Fragment]:
        """ZeRO-2: this rank's fragment of each parameter in the fp32 partitions (DeepSpeed's hp mapping);
        ZeRO-3: each parameter's fp32 partition (ceil(numel / world) elements at rank x that, less the
        padding)."""
        from deepspeed.utils import safe_get_local_fp32_param

        out = []
        for name, param in self.module.named_parameters():
            if not param.requires_grad:
                continue
            if self.stage == 3:
                shape, size = tuple(param.ds_shape), param.ds_tensor.ds_numel
                start = min(self.setup.layout.rank * size, param.ds_numel)
                values = safe_get_local_fp32_param(param).view(-1)[: param.ds_numel - start]
            else:
                shape, mapping = tuple(param.shape), getattr(param, "_hp_mapping", None)
                if mapping is None:  # no element of it in this rank's partition
                    start, values = 0, torch.empty(0, device=param.device)
                else:
                    start, values = mapping.lp_fragment_address.start, mapping.hp_fragment.view(-1)
            out.append(Fragment(name, shape, start, values))
        return out

    @torch.no_grad()
    def refresh_from_fragments(self) -> None:
        """The module's low-precision weights from the fp32 master ones: ZeRO-3 copies each local
        partition; ZeRO-2 (whole weights on every rank) assembles each parameter (a collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        for fragment, (_, param) in zip(
            self.trainable_fragments(),
            ((n, p) for n, p in self.module.named_parameters() if p.requires_grad),
            strict=True,
        ):
            if self.stage == 3:
                param.ds_tensor.data.view(-1)[: fragment.values.numel()].copy_(fragment.values)
            else:
                param.data.copy_(safe_get_full_fp32_param(param))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Collective: the full float32 master weights of the trainable parameters, on every rank (for
        tests and small models: everything is held at once)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                out[name] = safe_get_full_fp32_param(param).detach().to("cpu", copy=True)
        return out

    def model_state_bytes(self) -> dict[str, int]:
        """This rank's bytes of model state, measured from the tensors it holds (each storage once):

        params     the module's parameters: whole under zero2, this rank's partitions (plus any gathered
                   or persistent whole ones) under zero3
        grads      gradients / gradient partitions, as held at the last step() (0 before the first)
        master     the fp32 master weight partitions (DeepSpeed keeps them apart from the module's
                   parameters even in fp32, where DDP's parameters are their own master weights)
        optimizer  the AdamW state of those partitions (exp_avg, exp_avg_sq)
        buffers    DeepSpeed's gradient reduce bucket as held at the last step(): zero3 keeps one of
                   reduce_bucket_size elements (fp32 with bf16: communication in fp32) for the whole
                   run; zero2 allocates its buckets (two with overlap_comm) in each backward and frees
                   them at its end, so they never show here. Not model state, but memory it needs."""
        params: list[torch.Tensor] = []
        for p in self.module.parameters():
            params.append(p.data)
            if hasattr(p, "ds_tensor"):
                params.append(p.ds_tensor)
        state = [t for s in self.torch_optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        return {
            "params": held_bytes(params),
            "grads": self._step_bytes["grads"],
            "master": held_bytes(self._master_partitions()),
            "optimizer": held_bytes(state),
            "buffers": self._step_bytes["buffers"],
        }

    def _master_partitions(self) -> list[torch.Tensor]:
        attr = "fp32_partitioned_groups_flat" if self.stage == 3 else "single_partition_of_fp32_groups"
        return list(getattr(self.optimizer, attr, []))

    def _held_step_bytes(self) -> dict[str, int]:
        """Bytes of the gradients (partitions) held now, as model_state_bytes() reports them: module
        .grad tensors, ZeRO-2's reduced partitions, ZeRO-3's preallocated partition buffer, the fp32
        gradients of offloaded partitions; and of the gradient reduce buckets."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.stage == 3:
            flat = getattr(self.optimizer, "grad_partitions_flat_buffer", None)
            grads += [flat] if flat is not None else []
        else:
            for group in getattr(self.optimizer, "averaged_gradients", {}).values():
                grads += [g for g in group or [] if g is not None]
        grads += [m.grad for m in self._master_partitions() if m.grad is not None]
        buffers: list[torch.Tensor] = []
        for bucket in getattr(self.optimizer, "ipg_buckets", {}).values():
            held = getattr(bucket, "buffer", None)
            buffers += held if isinstance(held, list) else [held] if held is not None else []
        return {"grads": held_bytes(grads), "buffers": held_bytes(buffers)}


# ----------------------------------------------------------------------------------------------------
# Helpers


class _SkipInitWeights:
    """Makes WanModel.init_weights a no-op while constructing inside zero.Init (restored on exit)."""

    def __enter__(self) -> None:
        self._saved = WanModel.__dict__["init_weights"]
        WanModel.init_weights = lambda self: None

    def __exit__(self, *exc) -> None:
        WanModel.init_weights = self._saved


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _file_owner(name: str) -> int:
    """The rank a DeepSpeed checkpoint file belongs to: r for zero_pp_rank_{r}_*, else rank 0."""
    match = _RANK_FILE_RE.search(name)
    return int(match.group(1)) if match else 0


def apply_selective_leaf_blocks(model: WanModel) -> list[int]:
    """ZeRO-3: make each selectively checkpointed block a DeepSpeed leaf module (its hooks gather all
    its parameters at once; its submodules get none). Returns their indices.

    The selective checkpoint replays, op by op, what the block's forward ran, so nothing that runs
    inside it may differ between the forward and the backward's recompute. ZeRO-3's per-submodule
    hooks would run inside it (the block checkpoints inside its own call), fetching parameters by
    all-gathers whose number changes once prefetching starts (after the first traced forward, e.g. the
    eval loss's no_grad baseline): "encountered during backward but not found in storage". A leaf
    block's fetch and release run in its own hooks, outside the checkpoint."""
    from deepspeed.utils import set_z3_leaf_module

    leaves = [i for i, block in enumerate(model.blocks) if block.selective_checkpoint]
    for i in leaves:
        set_z3_leaf_module(model.blocks[i], True)
    return leaves


def check_rope_tables(model: nn.Module) -> None:
    """The RoPE cos/sin tables must be float32 (a cast or zero.Init would make them bf16)."""
    for name, buf in model.named_buffers():
        if name.endswith(("rope.cos", "rope.sin")) and buf.dtype != torch.float32:
            raise RuntimeError(f"{name} is {buf.dtype}, expected float32 RoPE tables")


# ----------------------------------------------------------------------------------------------------
# Traits


def preflight(cfg: RunConfig, device: torch.device, world_size: int | None) -> list[str]:
    """A deepspeed_config file merged over the config we generate: refused now, not at model build. A
    missing file is train.config's check_paths line already; world_size None (a check outside
    torchrun) leaves out the file's train_batch_size, which needs the number of ranks."""
    t, source = cfg.train, cfg.parallel.deepspeed_config
    if STAGES[cfg.parallel.engine] == 3 and cfg.lora.enabled and cfg.model.gradient_checkpointing == "selective":
        # Measured on deepspeed 0.19.8: the adapters' partitioned weights reach the selective block's
        # recompute ungathered (size 0) and backward fails; full checkpointing trains (tested).
        return [
            '[lora] with engine zero3 and gradient_checkpointing = "selective" is not supported yet (DeepSpeed '
            'recomputes the adapters ungathered); use gradient_checkpointing = "full" (or "none"), or engine fsdp'
        ]
    if not source or not Path(source).expanduser().is_file():
        return []
    setup = EngineSetup(
        parallel=cfg.parallel, optim=cfg.optim, mixed_precision=t.mixed_precision,
        micro_batch_size=t.train_batch_size, accumulation_steps=t.gradient_accumulation_steps,
        total_steps=max(t.max_train_steps, 1), layout=ParallelLayout.single(device),
    )  # fmt: skip
    try:
        theirs = read_override(source)
        if world_size is None:
            theirs.pop("train_batch_size", None)  # the global batch: ranks x what the config says
        merge_override(checked_config(setup, world_size or 1), theirs, source)
    except ValueError as err:
        return [str(err)]
    return []


def model_states(m: ModelStates) -> dict[str, float]:
    """Module weights in the compute dtype (partitioned under ZeRO-3), gradient partitions in it too,
    fp32 master partitions and their AdamW moments; offload_optimizer moves the master and the moments
    to the host, offload_param (ZeRO-3) the parameter partitions."""
    low = 4 if m.fp32 else 2
    n = m.layout.world_size  # partitions over every rank (sequence parallel ranks too, as torchtitan shards)
    shard = n if STAGES[m.parallel.engine] == 3 else 1
    out = {"params": low * m.total / shard, "grads": low * m.trainable / n, "master": 4 * m.trainable / n,
           "optimizer": 8 * m.trainable / n}  # fmt: skip
    return apply_offloads(out, m.parallel, ("master", "optimizer"))


def buffers(p, largest_block: int) -> dict[str, float]:
    """The gradient reduce bucket(s) and the all-gather bucket (ZeRO-2); ZeRO-3's reduce and prefetch
    buckets and the parameters it keeps gathered (two blocks' worth at most)."""
    if STAGES[p.engine] == 2:
        return {"deepspeed": p.reduce_bucket_size * 4 * (2 if p.overlap_comm else 1) + p.allgather_bucket_size * 2}
    live = min(p.stage3_max_live_parameters, 2 * largest_block) * 2
    return {"deepspeed": p.reduce_bucket_size * 4 + p.stage3_prefetch_bucket_size * 2 + live}


def _zero3_layout(folder: Path) -> bool:
    return bool(list((folder / TAG).glob("zero_pp_rank_*_model_states.pt")))


def _traits(name: str, **kwargs) -> EngineTraits:
    zero3 = STAGES[name] == 3
    return EngineTraits(
        name=name, build=DeepSpeedEngine, tied_to_world_size=True,
        fp16_off_cuda="DeepSpeed's CPU accelerator has no fp16 training (it reports fp16 unsupported on CPUs without "
        "oneDNN fp16 kernels, and its fp16 optimizer with loss scaling is a GPU path); use mixed_precision = 'bf16' "
        "(or 'fp32'), or engine 'ddp' / 'fsdp', which run fp16 on the CPU",
        videox_fun_flag="use_deepspeed", preflight=preflight, memory=model_states, buffers=buffers,
        checkpoint_reader=read_zero3 if zero3 else read_zero2,
        owns_checkpoint=lambda folder: (folder / TAG).is_dir() and _zero3_layout(folder) == zero3, **kwargs,
    )  # fmt: skip


TRAITS = {
    "zero2": _traits("zero2", summary="DeepSpeed: optimizer state and gradients sharded", offloads=frozenset({"optimizer"}),
                     flag_default=True),
    "zero3": _traits(
        "zero3", summary="DeepSpeed: parameters too", collective_inference=True, shards_parameters=True,
        offloads=frozenset({"optimizer", "param"}),
        # Measured (debug DiT, CPU, deepspeed 0.19.8): ZeRO-3's gather / release hooks on every submodule
        # break each compiled block into ~a dozen graphs, and a step ran ~100x slower.
        compiles="DeepSpeed's per-module parameter hooks break every compiled block into many small graphs "
        "(slower than eager); use engine 'fsdp' (sharded like zero3, compiles) or 'zero2' / 'ddp', or compile = false",
    ),
}  # fmt: skip
