"""The training loop every stage shares: steps, schedule, gradient sync, logging, checkpoints, resume, NaN stop.

A stage hands the loop a `step_fn(step) -> metrics` that runs forward and backward for batch `step`; the loop
does everything around it. Gradients of the (small) trainable set are averaged across processes explicitly, so
the same code runs on one CPU, under `accelerate launch` on several GPUs, and with two gloo processes in tests.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import OptimConfig, RunConfig
from ..errors import LinearizeError
from .checkpoint import FINAL_FILE, atomic_save, load_stage_state, save_stage_state, set_rng_state, trainable_state
from .runfolder import has_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    """Where this process sits: rank, world size, device."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> Dist:
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=_default_device(dist.get_rank()))
        return cls(device=_default_device(0))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average(self, tensors: list[torch.Tensor]) -> None:
        if self.world > 1:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world)

    def mean_scalar(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world


def _default_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, steps: int):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(1, steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StageResult:
    """What a finished stage reports."""

    name: str
    steps: int
    tokens: int
    seconds: float
    first_loss: float | None
    final_loss: float | None
    val_loss: float | None = None
    extra: dict = field(default_factory=dict)


def run_stage(
    name: str,
    named_params: dict[str, torch.nn.Parameter],
    optim_cfg: OptimConfig,
    steps: int,
    tokens_per_step: int,
    step_fn: Callable[[int], dict],
    run_dir: Path,
    run_cfg: RunConfig,
    ctx: Dist,
    resume: bool,
    eval_fn: Callable[[], float] | None = None,
    on_resume: Callable[[dict], None] | None = None,
    extra_fn: Callable[[], dict] | None = None,
) -> StageResult:
    """Train `named_params` for `steps` steps of `step_fn`, checkpointing under `run_dir/checkpoints/<name>`.

    A stage whose final checkpoint exists is not run again on resume: its trained tensors are loaded instead, and
    its result, with the `extra` that `extra_fn` gave after the final evaluation (e.g. per-layer errors), comes
    back from that checkpoint.
    """
    folder = Path(run_dir) / "checkpoints" / name
    final_path = folder / FINAL_FILE
    params = list(named_params.values())
    if resume and final_path.is_file():
        from .checkpoint import load_checkpoint, load_trainable

        final = load_checkpoint(final_path, f"the result of stage {name}")
        load_trainable(named_params, final["params"])
        logger.info("stage %s already finished in %s; loaded its result", name, folder)
        return StageResult(**final["result"])

    optimizer, scheduler = make_optimizer(params, optim_cfg, steps)
    start, first_loss, elapsed_before = 0, None, 0.0
    state = load_stage_state(folder) if resume else None
    if state is not None:
        from .checkpoint import load_trainable

        load_trainable(named_params, state["params"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_settings(optimizer, scheduler, optim_cfg)
        set_rng_state(state["rng"])
        start = state["step"] + 1
        first_loss = state["extra"].get("first_loss")
        elapsed_before = state["extra"].get("seconds", 0.0)
        if on_resume is not None:
            on_resume(state["extra"])
        logger.info("resuming stage %s at step %d of %d", name, start, steps)

    metrics_path = Path(run_dir) / "metrics.jsonl"
    if resume and ctx.main:
        _drop_metrics_from(metrics_path, name, start)
    bar = None
    if ctx.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_good = state["step"] if state is not None else None
    loss = None
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=True)
        metrics = step_fn(step)
        loss = ctx.mean_scalar(float(metrics["loss"]))
        if not math.isfinite(loss):
            where = f"{folder / 'state.pt'} (step {last_good})" if last_good is not None else "none yet"
            # A run with no checkpoint at all is removed on failure, so --resume would find nothing.
            again = "rerun with --resume and" if last_good is not None or has_checkpoint(run_dir) else "rerun with"
            raise LinearizeError(
                f"stage {name} step {step}: loss is {loss}; last good checkpoint: {where}. Lower the learning rate: "
                f"{again} --set {name}.optim.lr=<smaller>"
            )
        ctx.average([p.grad for p in params if p.grad is not None])
        if optim_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        first_loss = loss if first_loss is None else first_loss
        if step == start + 2 and ctx.main:
            left = (time.perf_counter() - t0) / 3 * (steps - step - 1)
            # Past a day the budget is more likely a typo than a plan: say so loudly.
            log = logger.warning if left > 86400 else logger.info
            log("%s: %d steps left, about %s at the pace of the first steps", name, steps - step - 1, _duration(left))
        seconds = elapsed_before + time.perf_counter() - t0
        done_tokens = (step + 1) * tokens_per_step
        if bar is not None:
            rate = (step + 1 - start) * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{rate:,.0f}")
            bar.update(1)
        if ctx.main and (step % run_cfg.log_every == 0 or step == steps - 1):
            record = {
                "stage": name,
                "step": step,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens": done_tokens,
                "seconds": round(seconds, 3),
            }
            record.update({k: v for k, v in metrics.items() if k != "loss"})
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if eval_fn is not None and run_cfg.eval_every and (step + 1) % run_cfg.eval_every == 0 and step < steps - 1:
            val = eval_fn()
            if ctx.main:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps({"stage": name, "step": step, "val_loss": val}) + "\n")
        if (step + 1) % run_cfg.checkpoint_every == 0 and step < steps - 1:
            if ctx.main:
                save_stage_state(
                    folder, step, named_params, optimizer, scheduler, {"first_loss": first_loss, "seconds": seconds}
                )
            ctx.barrier()
            last_good = step
    if bar is not None:
        bar.close()
    val_loss = eval_fn() if eval_fn is not None else None
    result = StageResult(
        name=name,
        steps=steps,
        tokens=steps * tokens_per_step,
        seconds=round(elapsed_before + time.perf_counter() - t0, 2),
        first_loss=first_loss,
        final_loss=loss,
        val_loss=val_loss,
        extra=extra_fn() if extra_fn is not None else {},
    )
    if ctx.main:
        atomic_save({"params": trainable_state(named_params), "result": result.__dict__}, final_path)
        (folder / "state.pt").unlink(missing_ok=True)
    ctx.barrier()
    return result


def _apply_settings(optimizer, scheduler, cfg: OptimConfig) -> None:
    """Use the recipe's optimiser settings over those saved in a checkpoint (a resume may lower the lr)."""
    factor = scheduler.lr_lambdas[0]
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(initial_lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)


def _drop_metrics_from(path: Path, stage: str, start: int) -> None:
    """Remove the lines of `stage` at or after step `start`: a resumed run writes them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not (record.get("stage") == stage and record.get("step", -1) >= start):
            kept.append(line if line.endswith("\n") else line + "\n")
    from ..fileio import atomic_write_text

    atomic_write_text(path, "".join(kept))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
