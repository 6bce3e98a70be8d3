"""Megatron-LM's log line format, plus TensorBoard and W&B scalars."""

import time
from typing import Dict, Optional

import torch.distributed as dist


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    """Megatron-LM prints training progress from the last rank (it holds the LM loss)."""
    if is_last_rank():
        print(message, flush=True)


class TrainingLogger:
    """Formats iteration/validation lines as Megatron-LM does and writes the same scalars."""

    def __init__(self, args):
        self.args = args
        self.writer = None
        self.wandb = None
        if is_last_rank() and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        if is_last_rank() and args.wandb_project:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None,
                                    dir=args.wandb_save_dir or None, config=vars(args))
        self._last = time.time()

    def iteration(self, iteration: int, consumed: int, lr: float, metrics: Dict[str, Optional[float]],
                  skipped: int, nan_iters: int, loss_scale: float, global_batch_size: Optional[int] = None) -> None:
        now = time.time()
        elapsed_ms = (now - self._last) * 1000.0 / self.args.log_interval
        self._last = now
        a = self.args
        parts = [f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{a.train_iters:8d}",
                 f"consumed samples: {consumed:12d}",
                 f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
                 f"learning rate: {lr:.6E}", f"global batch size: {global_batch_size or a.global_batch_size:5d}"]
        for key in ("lm loss", "let loss", "let cos", "let lambda", "let ratio", "let grad cos"):
            if metrics.get(key) is not None:
                parts.append(f"{key}: {metrics[key]:.6E}")
        parts.append(f"loss scale: {loss_scale:.1f}")
        if metrics.get("grad norm") is not None:
            parts.append(f"grad norm: {metrics['grad norm']:.3f}")
        parts += [f"number of skipped iterations: {skipped:3d}", f"number of nan iterations: {nan_iters:3d}"]
        print_rank_last(" | ".join(parts) + " |")
        scalars = {key: value for key, value in metrics.items() if value is not None}
        scalars.update({"learning-rate": lr, "loss-scale": loss_scale,
                        "iteration-time": elapsed_ms / 1000.0})
        self._write(scalars, iteration)

    def validation(self, iteration: int, lm_loss: float) -> None:
        import math

        ppl = math.exp(min(20.0, lm_loss))
        line = f" validation loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | lm loss PPL: {ppl:.6E} | "
        print_rank_last("-" * (len(line) + 1) + "\n" + line + "\n" + "-" * (len(line) + 1))
        self._write({"lm loss validation": lm_loss, "lm loss validation ppl": ppl}, iteration)

    def _write(self, scalars: Dict[str, float], iteration: int) -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
