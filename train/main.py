"""Train Wan2.1: `torchrun --nproc_per_node N -m train.main --cfg configs/X.toml [--section.key=value ...]`.

Setup in order (config, processes, models, data, engine, schedule, resume, metrics), then one loop:
each optimizer step takes `gradient_accumulation_steps` micro-batches, encodes them with the frozen
VAE / umT5 / CLIP under no_grad, noises the latents (flow matching), and trains the DiT to predict the
velocity. Every random draw of a step (noise, timesteps; in the data: frames, caption dropout) is
derived from (seed, step, position in the global batch), so a resumed run repeats an uninterrupted one
and the result does not depend on how the global batch is split over ranks and micro-steps.
"""

import contextlib
import datetime
import gc
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import capture_rng_state, load_checkpoint, resolve_resume, restore_rng_state, save_checkpoint
from train.config import ConfigError, RunConfig, config_to_toml, load_config
from train.data.dataset import pixels_to_model
from train.data.loader import build_dataloader
from train.engine import build_engine
from train.flow import FlowMatching, batch_positions
from train.lr import build_lr_scheduler
from train.metrics import StepTimer, build_metrics
from train.models import Models, apply_trainable_modules, build_models
from wan.encoders import encode_i2v_condition, encode_latents

log = logging.getLogger("train")


def init_distributed(backend: str) -> tuple[int, int, torch.device]:
    """torchrun's environment -> (rank, world_size, device); a plain `python -m train.main` is one rank."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return rank, world_size, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def count_steps(sampler, cfg: RunConfig) -> int:
    """Optimizer steps of the run: max_train_steps, or every step of num_train_epochs epochs (epochs
    differ by the remainders carried between them, so each is counted)."""
    if cfg.train.max_train_steps > 0:
        return cfg.train.max_train_steps
    epoch = sampler.epoch
    total = 0
    for e in range(cfg.train.num_train_epochs):
        sampler.set_epoch(e)
        total += sampler.batches_per_epoch()
    sampler.set_epoch(epoch)
    return total


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed(cfg.parallel.backend)
        if self.rank != 0:  # console logs from rank 0 only; other ranks' bad files reach it at the end
            logging.getLogger().setLevel(logging.ERROR)
        # The global RNGs only seed what is not derived per step (nothing in the loop draws from them);
        # they are still saved and restored per rank for code that might.
        torch.manual_seed(cfg.train.seed + self.rank)
        self.out = Path(cfg.train.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(config_to_toml(cfg))
        barrier()

        m = cfg.model
        self.models: Models = build_models(
            m.pretrained_model_name_or_path, m.preset, m.train_mode, self.device, cfg.train.seed, m.low_vram
        )
        dit = self.models.dit
        trainable, total = apply_trainable_modules(dit, m.trainable_modules)
        if m.gradient_checkpointing:
            dit.set_gradient_checkpointing(True, every=m.gradient_checkpointing_every)
        self.log(f"DiT: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.1f}%)")

        t = cfg.train
        self.accumulation = t.gradient_accumulation_steps
        self.loader, self.sampler, self.tracker = build_dataloader(
            cfg.data, t.train_batch_size, self.rank, self.world_size, t.seed,
            pin_memory=self.device.type == "cuda", accumulation_steps=self.accumulation,
        )  # fmt: skip
        self.total_steps = count_steps(self.sampler, cfg)
        o = cfg.optim
        self.engine = build_engine(
            cfg.parallel.engine, dit, self.device, learning_rate=o.learning_rate,
            betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay, eps=o.adam_epsilon,
        )  # fmt: skip
        self.scheduler = build_lr_scheduler(self.engine.optimizer, o.lr_scheduler, o.lr_warmup_steps, self.total_steps)
        self.flow = FlowMatching(
            shift=t.shift, weighting_scheme=t.weighting_scheme, logit_mean=t.logit_mean, logit_std=t.logit_std,
            uniform_sampling=t.uniform_sampling,
        )  # fmt: skip
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if t.mixed_precision == "bf16"
            else contextlib.nullcontext()
        )

        self.step, self.epoch, self.epoch_step, self.nonfinite_in_row = 0, 0, 0, 0
        resume = resolve_resume(self.out, cfg.checkpoint.resume_from_checkpoint)
        if resume is not None:
            self.resume(resume)
        self.metrics = build_metrics(
            self.out, rank=self.rank, total_steps=self.total_steps, start_step=self.step,
            log_every=cfg.logging.log_every, progress_bar=cfg.logging.progress_bar,
            loss_smoothing=cfg.logging.loss_smoothing, timestep_bins=cfg.logging.timestep_bins,
        )  # fmt: skip
        self.timer = StepTimer(self.device)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    # --- checkpoints ------------------------------------------------------------------------------

    def save(self) -> None:
        optim_tensors, optim_meta = self.engine.optimizer_state()
        save_checkpoint(
            self.out, self.step, rank=self.rank, world_size=self.world_size, barrier=barrier,
            model_tensors=self.engine.trainable_state(), optimizer_tensors=optim_tensors, optimizer_meta=optim_meta,
            scheduler_state=self.scheduler.state_dict(), sampler_state=self.sampler.state_dict(self.epoch_step),
            trainer_state=self.trainer_state(), config_text=config_to_toml(self.cfg), rng_state=capture_rng_state(),
            total_limit=self.cfg.checkpoint.checkpoints_total_limit,
        )  # fmt: skip

    def trainer_state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "nonfinite_in_row": self.nonfinite_in_row,
            "served": self.tracker.served, "skips": self.tracker.skips,
        }  # fmt: skip

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.rank)
        state = ckpt.trainer_state
        if ckpt.world_size != self.world_size:
            raise ValueError(
                f"{path} was written by {ckpt.world_size} ranks, this run has {self.world_size}: "
                "the data order and the per-rank states depend on it"
            )
        self.engine.load_trainable_state(ckpt.model_tensors, str(path / "model.safetensors"))
        self.engine.load_optimizer_state(ckpt.optimizer_tensors, ckpt.optimizer_meta)
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        self.sampler.load_state_dict(ckpt.sampler_state)
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        self.tracker.served, self.tracker.skips = state["served"], state["skips"]
        restore_rng_state(ckpt.rng_state)  # last, after everything that might draw
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, step {self.epoch_step} of it)")

    # --- one optimizer step -----------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, batch: dict) -> dict:
        """The DiT's inputs for a micro-batch: x0 latents, context, and for i2v clip_fea and y."""
        m = self.models
        pixels = pixels_to_model(batch["pixels"].to(self.device, non_blocking=True))  # [B, 3, F, H, W]
        del batch["pixels"]  # the shared buffer goes back to its worker
        x0 = encode_latents(m.vae, pixels, self.cfg.model.vae_mini_batch, offload=self.cfg.model.low_vram)
        inputs = {"x0": x0.float(), "context": m.text(batch["text"], device=self.device)}
        if m.clip is not None:
            y, clip_fea = encode_i2v_condition(
                m.vae, m.clip, pixels[:, :, 0], pixels.shape[2], offload=self.cfg.model.low_vram
            )
            inputs.update(y=y, clip_fea=clip_fea)
        return inputs

    def micro_step(self, batch: dict, micro: int) -> tuple[float, torch.Tensor, torch.Tensor, int]:
        with self.timer.section("encode"):
            inputs = self.encode(batch)
        x0 = inputs["x0"]
        b = x0.shape[0]
        # Position of each sample in the global batch: (micro-step, rank, index), as the sampler lays it out.
        positions = batch_positions(micro, self.rank, self.world_size, b)
        global_size = self.accumulation * self.world_size * b
        seed = self.cfg.train.seed
        sigmas = self.flow.sample_sigmas(seed, self.step, positions, global_size).to(self.device)
        noise = self.flow.sample_noise(seed, self.step, positions, tuple(x0.shape[1:])).to(self.device)
        x_t = self.flow.add_noise(x0, noise, sigmas)
        target = self.flow.target(x0, noise)
        t = self.flow.timesteps(sigmas)
        last = micro == self.accumulation - 1
        with self.engine.sync(last):
            with self.timer.section("forward"), self.autocast:
                pred = self.engine.model(x_t, t, inputs["context"], clip_fea=inputs.get("clip_fea"), y=inputs.get("y"))
                loss, per_sample = self.flow.loss(pred, target)
            with self.timer.section("backward"):
                self.engine.backward(loss / self.accumulation)
        _, f, h, w = x0.shape[1:]
        tokens = b * f * (h // 2) * (w // 2)  # latent patches of 1x2x2
        return loss.item(), t.detach().cpu(), per_sample.detach().cpu(), tokens

    def train(self) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        self.log(
            f"training {self.total_steps} steps from step {self.step}: {self.world_size} rank(s) x batch "
            f"{cfg.train.train_batch_size} x {self.accumulation} micro-steps on {self.device}"
        )
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch)  # the same epoch keeps a resumed offset
            batches = iter(self.loader)
            while self.step < self.total_steps:
                step_start = time.perf_counter()
                loss_sum, samples, tokens, ts, losses = 0.0, 0, 0, [], []
                for micro in range(self.accumulation):
                    with self.timer.section("data_wait"):
                        batch = next(batches, None)
                    if batch is None:
                        break
                    self.tracker.update(batch)
                    loss, t, per_sample, n_tokens = self.micro_step(batch, micro)
                    loss_sum, samples, tokens = loss_sum + loss, samples + len(t), tokens + n_tokens
                    ts.append(t)
                    losses.append(per_sample)
                if batch is None:
                    assert micro == 0, "the sampler yields whole optimizer steps"
                    break
                with self.timer.section("optimizer"):
                    grad_norm, updated = self.engine.step(cfg.optim.max_grad_norm)
                    with warnings.catch_warnings():  # a skipped update still advances the schedule
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                        self.scheduler.step()
                self.step += 1
                self.epoch_step += 1
                self.after_step(step_start, loss_sum, samples, tokens, ts, losses, grad_norm, updated)
            else:
                break
            self.epoch, self.epoch_step = self.epoch + 1, 0
        if self.step % max(cfg.checkpoint.checkpointing_steps, 1) != 0 or cfg.checkpoint.checkpointing_steps == 0:
            self.save()  # the final state, unless the last step just saved it
        first, last = self.metrics.first_and_last_smoothed()
        self.metrics.close()
        self.log_bad_samples()
        if first is not None:
            trend = "fell" if last < first else "did NOT fall"
            self.log(
                f"smoothed loss: first {first:.4f}, last {last:.4f}: it {trend} "
                f"({self.step} steps, {time.perf_counter() - t0:.0f} s)"
            )
        self.log(f"TensorBoard: tensorboard --logdir {self.out / 'tensorboard'}")

    def log_bad_samples(self) -> None:
        """Every rank's bad files and counts, summed on rank 0."""
        tracker = self.tracker
        mine = {"served": tracker.served, "skips": tracker.skips, "bad": tracker.bad}
        every = [mine]
        if dist.is_initialized():
            every = [None] * self.world_size
            dist.all_gather_object(every, mine)
        if self.rank == 0:
            bad = {path: reason for e in every for path, reason in e["bad"].items()}
            served, skips = sum(e["served"] for e in every), sum(e["skips"] for e in every)
            self.log(
                f"{served} samples served on {self.world_size} rank(s); {skips} failed loads and {tracker.refused} "
                f"samples refused up front; {len(bad)} bad files in all"
                + "".join(f"\n  {path}: {reason}" for path, reason in sorted(bad.items()))
            )

    def after_step(self, step_start, loss_sum, samples, tokens, ts, losses, grad_norm, updated) -> None:
        cfg = self.cfg
        with self.timer.section("logging"):
            loss_sum, samples, tokens = all_reduce_sum([loss_sum, samples, tokens], self.device)
            loss = loss_sum / (self.accumulation * self.world_size)
            skipped = not updated or not math.isfinite(loss)
            self.nonfinite_in_row = self.nonfinite_in_row + 1 if skipped else 0
            timesteps = all_gather_cat(torch.cat(ts).to(self.device)).cpu()
            per_sample = all_gather_cat(torch.cat(losses).to(self.device)).cpu()
        sections = self.timer.reset()
        step_time = time.perf_counter() - step_start
        self.metrics.log_step(
            self.step, loss=loss, lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm, samples=int(samples),
            tokens=int(tokens), step_time=step_time, data_wait=sections.pop("data_wait", 0.0), timesteps=timesteps,
            per_sample_loss=per_sample, sections=sections, skipped=skipped,
        )  # fmt: skip
        if skipped:
            self.metrics.log_text(f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}: update skipped")
            if self.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                raise RuntimeError(
                    f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (max_nonfinite_steps="
                    f"{cfg.train.max_nonfinite_steps}); lower the learning rate or check the data and resume "
                    f"from the last checkpoint"
                )
        every = cfg.checkpoint.checkpointing_steps
        if every and self.step % every == 0:
            self.save()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        trainer = Trainer(cfg)
    except ValueError as err:  # a user error found during setup (data, weights, checkpoint): no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    trainer.train()
    # Only after a clean finish (a collective teardown while another rank failed would hang): every rank
    # done, the DDP reducer and loader workers freed while the process group still exists, then the
    # group. Exiting with live gloo work threads aborted ~1 in 4 CPU runs ("terminate called without an
    # active exception").
    barrier()
    del trainer
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
