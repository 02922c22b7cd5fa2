"""The training loop every gradient-based method shares: accelerate, per-step seeds, checkpoints, resume, a NaN
guard, progress and timing.

A method supplies ``step_fn(step, generator) -> dict`` that computes its losses, calls ``loop.backward`` and steps its
optimizers; the loop does the rest:

- **accelerate**: ``accelerate launch --num_processes N -m erase train ...`` gives data-parallel training (gradients
  all-reduced by DDP; CPU processes use gloo). Each process draws its own samples.
- **seeds**: every step's randomness comes from a generator seeded by ``(seed, step, process)``, so a step is the
  same whether the run was resumed or not.
- **checkpoints** every ``checkpoint_every`` steps (`erase.training.checkpoint`): trainable weights, every
  optimizer, the step and the config; ``resume=True`` continues from the newest one and ends with
  the same tensors as an uninterrupted run.
- **NaN guard**: a non-finite loss or weight stops the run with `TrainingDiverged` (one line: step, value, the last
  good checkpoint) before anything is written, so the last checkpoint stays intact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erase.training import checkpoint as ckpt


class TrainingDiverged(RuntimeError):
    """The loss or a weight became NaN/inf; the message is one line."""


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The generator of one step: independent of how the run got there (fresh or resumed)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + process * 104_729) % (2**63 - 1))


def accelerator_state():
    """accelerate's process state (CPU processes over gloo when there is no CUDA)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class PassTimer:
    """Seconds spent inside model passes: forward hooks on the given modules, plus backward passes timed by the loop.

    It is what ``step / passes`` ratios are made of: everything else in a step is the method's and the loop's overhead.
    """

    def __init__(self, modules: list[torch.nn.Module]):
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0
        self._handles = []
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def remove(self) -> None:
        """Take the hooks off (the frozen modules are the user's pipeline components)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, *_):
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start

    def add(self, seconds: float) -> None:
        self.seconds += seconds


def adam(parameters, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam without weight decay (a zero gradient never moves a weight: gradient masks stay exact), fused where
    torch has a fused kernel for the parameters' device (4x faster than the per-tensor loop for hundreds of tensors
    on CPU)."""
    parameters = list(parameters)
    try:
        return torch.optim.Adam(parameters, lr=lr, betas=betas, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(parameters, lr=lr, betas=betas, weight_decay=0.0)


class TrainingLoop:
    """Runs ``steps`` optimisation steps of a method.

    Args:
        config: the method's config dataclass (``seed``, ``steps``, ``checkpoint_every``, ``max_grad_norm``).
        modules (`dict[str, nn.Module]`): every module with trainable weights to checkpoint (by name).
        optimizers (`dict[str, torch.optim.Optimizer]`): every optimizer to checkpoint (by name).
        checkpoint_dir (`Path | None`): where checkpoints go (needed for ``checkpoint_every`` and ``resume``).
        resume (`bool`): continue from the newest checkpoint in ``checkpoint_dir``.
        desc (`str`): the progress bar's label.
        progress (`bool`): show the progress bar.
    """

    def __init__(
        self,
        config,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        *,
        checkpoint_dir: Path | None = None,
        resume: bool = False,
        desc: str = "train",
        progress: bool = True,
        method: str = "",
        frozen: list[torch.nn.Module] | None = None,
    ):
        from accelerate import Accelerator

        self.config = config
        self.method = method
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        names = list(modules)
        prepared = self.accelerator.prepare(*modules.values(), *optimizers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self.modules = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(optimizers, prepared[len(names) :]))
        self.raw_modules = modules
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume
        self.desc = desc
        self.progress = progress
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.stats: dict = {}
        self.timer = PassTimer([*modules.values(), *(frozen or [])])
        if resume:  # refuse a missing, damaged or too advanced checkpoint now, before a method spends minutes sampling
            self._check_resumable(self._checkpoint_to_resume())

    @property
    def process(self) -> int:
        return self.accelerator.process_index

    def backward(self, loss: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.accelerator.backward(loss)
        self.timer.add(time.perf_counter() - t0)

    def gradients(self, loss: torch.Tensor, parameters: list[torch.Tensor], retain_graph: bool = False) -> list:
        """``torch.autograd.grad`` of ``loss`` (None for parameters it does not reach), timed as a backward pass.

        For methods that combine several gradients before stepping (gradient surgery). DDP's hooks do not fire here:
        run the forward through the unwrapped module and average across processes (``accelerator.reduce``)."""
        t0 = time.perf_counter()
        grads = torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True)
        self.timer.add(time.perf_counter() - t0)
        return list(grads)

    def clip(self, parameters) -> None:
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(parameters, self.config.max_grad_norm)

    def _checkpoint_to_resume(self) -> Path:
        if self.checkpoint_dir is None:
            raise ValueError("--resume needs a checkpoint folder; pass --checkpoint-dir (or the same --out as before)")
        found = ckpt.latest(self.checkpoint_dir)
        if found is None:
            raise ValueError(f"--resume: no checkpoint in {self.checkpoint_dir}; run without --resume to start afresh")
        return found

    def _check_resumable(self, found: Path) -> None:
        """Refuse a damaged checkpoint (hashes), and one past ``steps``, which would come out as a patch of more steps
        than it says."""
        step = ckpt.read_header(found, check_data=True)["step"]
        if step > self.config.steps:
            raise ValueError(
                f"--resume: {found} is at step {step}, past --steps {self.config.steps}; pass --steps {step} or more, "
                "or drop --resume to start afresh"
            )

    def _restore(self) -> None:
        if not self.resume:
            return
        found = self._checkpoint_to_resume()  # checked by _check_resumable when the loop was made
        self.start_step = ckpt.load(
            found, self.raw_modules, self.optimizers, self.config, self.method, check_data=False
        )
        self.last_checkpoint = found

    def _check_finite(self, step: int, logs: dict[str, float]) -> None:
        bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
        if not bad:
            for name, module in self.raw_modules.items():
                named = [(pname, p) for pname, p in module.named_parameters() if p.requires_grad]
                if not named:
                    continue
                # one fused norm per module: a NaN/inf entry makes its tensor's norm non-finite (hundreds of
                # per-tensor isfinite calls cost ~10% of a step on a small UNet)
                norms = torch.stack(torch._foreach_norm([p.detach() for _, p in named]))
                if not torch.isfinite(norms).all():
                    pname = named[int((~torch.isfinite(norms)).nonzero()[0])][0]
                    bad = {f"{name}.{pname}": float("nan")}
                    break
        if bad:
            what, value = next(iter(bad.items()))
            where = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was written (use --checkpoint-every)"
            )
            raise TrainingDiverged(
                f"training diverged at step {step}: {what} is {value}; {where}; lower --lr (or --max-grad-norm) and "
                "run again (with --resume to continue from the checkpoint)"
            )

    def run(self, step_fn: Callable[[int, torch.Generator], dict[str, float]]) -> dict:
        """Run the remaining steps; returns timing statistics (also in ``self.stats``)."""
        self._restore()
        steps = self.config.steps
        started = time.perf_counter()
        bar = tqdm(
            total=steps,
            initial=self.start_step,
            desc=self.desc,
            disable=not (self.progress and self.accelerator.is_local_main_process),
        )
        step_times = []
        passes_before = self.timer.seconds
        try:
            for step in range(self.start_step + 1, steps + 1):
                t0 = time.perf_counter()
                logs = step_fn(step, step_generator(self.config.seed, step, self.process))
                step_times.append(time.perf_counter() - t0)
                self._check_finite(step, logs)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                bar.update(1)
                every = self.config.checkpoint_every
                if self.checkpoint_dir and every and step % every == 0 and step < steps:
                    self._save(step)
        finally:
            self.timer.remove()
            bar.close()
        passes = self.timer.seconds - passes_before
        self.accelerator.wait_for_everyone()
        self.stats = {
            "steps": steps,
            "steps_this_run": steps - self.start_step,
            "resumed_from_step": self.start_step or None,
            "train_seconds": round(time.perf_counter() - started, 3),
            "median_step_seconds": round(sorted(step_times)[len(step_times) // 2], 5) if step_times else None,
            "model_pass_seconds": round(passes, 3),
            "step_over_passes": round(sum(step_times) / passes, 4) if passes > 0 else None,
            "processes": self.accelerator.num_processes,
            "torch_threads": torch.get_num_threads(),
        }
        return self.stats

    def _save(self, step: int) -> None:
        if self.accelerator.is_main_process:
            self.last_checkpoint = ckpt.save(
                self.checkpoint_dir, step, self.raw_modules, self.optimizers, self.config, self.method
            )
        self.accelerator.wait_for_everyone()
