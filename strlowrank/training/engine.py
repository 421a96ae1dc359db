"""The one training loop every track shares.

A track hands the engine a :class:`Task` (model, datasets, an example input for the budget, optional
callbacks (strlowrank.training.callbacks) and augmentation) and a
:class:`~strlowrank.training.train_config.TrainConfig`; the engine trains with warm-up + cosine,
label smoothing, SGD/Adam, clipping and autocast, evaluates every epoch, and keeps the run folder:

    config.yaml (written by the entry script), metrics.csv (a row per epoch), budget.csv,
    budget_history.csv (per-layer rows per epoch), summary.json, checkpoint.pt

metrics.csv and budget_history.csv are rewritten from the history stored in the checkpoint, so an
interrupted and resumed run ends with exactly the files of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from strlowrank.method import budget as budget_mod
from strlowrank.method.cache import write_atomic
from strlowrank.training.callbacks import Callback, call_hook, check_callbacks
from strlowrank.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from strlowrank.training.distributed import DistInfo, EpochSampler, all_reduce_sum, replicas_in_sync
from strlowrank.training.measures import budget_warnings
from strlowrank.training.optim import (
    build_optimizer,
    describe_groups,
    param_groups,
    warmup_cosine,
    warmup_cosine_factor,
)
from strlowrank.training.train_config import TrainConfig, role_decays, role_lrs, use_channels_last


@dataclass
class Task:
    """What a track gives the engine. Batches are (inputs, integer targets)."""

    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset | None = None
    example_input: torch.Tensor | None = None  # one small batch for the budget's MACs
    budget_include: tuple[str, ...] = ("*",)
    budget_exclude: tuple[str, ...] = ()
    callbacks: list[Callback] = field(default_factory=list)
    augment: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None  # train batches, on device
    describe: Callable[[pd.DataFrame], str] | None = None  # extra text for the epoch line
    summarize: Callable[[pd.DataFrame], dict] | None = None  # extra summary.json entries


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: a checkpoint was saved; resume with --resume."""


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1 correct, top-5 correct) counts of a batch."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y[:, None])
    return float(hit[:, 0].sum()), float(hit.any(dim=1).sum())


def _input_dim(task: Task) -> int | None:
    """Dimensions of a batch of ``task``'s inputs (its example input, else a training item)."""
    if task.example_input is not None:
        return task.example_input.dim()
    if len(task.train_set) == 0:
        return None
    x = task.train_set[0][0]
    return x.dim() + 1 if isinstance(x, torch.Tensor) else None


class Trainer:
    """Train and evaluate ``task.model`` as configured; only rank 0 prints and writes."""

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        out_dir: str | Path,
        info: DistInfo,
        config_dict: dict | None = None,
    ) -> None:
        self.task, self.cfg, self.info = task, cfg, info
        self.out = Path(out_dir)
        self.config_dict = config_dict or {}
        self.model = task.model.to(info.device)
        self.channels_last = use_channels_last(cfg.channels_last, info.device, _input_dim(task))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        self.net: nn.Module = self.model
        if info.enabled:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if info.device.type == "cuda" else "off")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=amp == "fp16")
        if cfg.batch_size % info.world_size:
            raise ValueError(
                f"train.batch_size {cfg.batch_size} is not divisible by the "
                f"{info.world_size} processes"
            )
        self.batch_size = cfg.batch_size // info.world_size  # per process
        self.steps_per_epoch = math.ceil(
            len(EpochSampler(len(task.train_set), 0, 0, False, info)) / self.batch_size
        )
        total = cfg.epochs * self.steps_per_epoch
        self.groups = param_groups(
            self.model, cfg.weight_decay, role_decays(cfg), role_lrs(cfg, total)
        )
        self.optimizer = build_optimizer(
            self.groups, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov, cfg.role_optimizer
        )
        check_callbacks(task.callbacks)
        self.before_step = [cb for cb in task.callbacks if hasattr(cb, "on_before_step")]
        for cb in task.callbacks:  # callbacks that steer the optimizer (budget controller)
            call_hook(cb, "bind", self.optimizer)
        self.warmup_steps, self.total_steps = round(cfg.warmup_epochs * self.steps_per_epoch), total
        self.scheduler = warmup_cosine(self.optimizer, self.warmup_steps, total, cfg.min_lr_ratio)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.partial = [0.0, 0.0, 0.0]  # loss sum, correct, count of the current epoch
        self.history: list[dict] = []
        self.budget_history: list[dict] = []
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------------------- logging
    def lr_factor(self) -> float:
        """The schedule's factor now (every group's lr is its peak lr times it)."""
        return warmup_cosine_factor(
            self.step, self.warmup_steps, self.total_steps, self.cfg.min_lr_ratio
        )

    def log(self, text: str) -> None:
        if self.info.is_main:
            tqdm.write(text)

    def budget(self) -> pd.DataFrame:
        ex = self.task.example_input
        if ex is not None:
            ex = ex.to(self.info.device)
        return budget_mod.budget_table(
            self.model, ex, self.task.budget_include, self.task.budget_exclude
        )

    # ----------------------------------------------------------------------------- data
    def loader(self, dataset: Dataset, epoch: int, train: bool, start: int = 0) -> DataLoader:
        sampler = EpochSampler(
            len(dataset),
            self.cfg.seed,
            epoch,
            shuffle=train,
            info=self.info,
            start=start * self.batch_size,
            pad=train,
        )
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.cfg.workers,
            generator=g,
            pin_memory=self.info.device.type == "cuda",
            persistent_workers=False,
        )

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.info.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.info.device, non_blocking=True)

    def _autocast(self):
        return torch.autocast(
            self.info.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    # ----------------------------------------------------------------------------- steps
    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        if self.task.augment is not None:
            x, y = self.task.augment(x, y)
        with self._autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        value = float(loss.detach())
        if not math.isfinite(value):
            ckpt = self.out / "checkpoint.pt"
            kept = f"the last good checkpoint is {ckpt}" if ckpt.is_file() else "no checkpoint yet"
            raise TrainingError(
                f"non-finite loss ({value}) at epoch {self.epoch + 1}, step {self.step}; {kept}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad > 0 or self.before_step:
            self.scaler.unscale_(self.optimizer)
        for cb in self.before_step:
            call_hook(cb, "on_before_step", self.model)
        if self.cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for cb in self.task.callbacks:
            call_hook(cb, "on_step_end", self.model, self.step)
        self.step += 1
        return value * len(y), float((logits.argmax(1) == y).sum())

    def _train_epoch(self) -> tuple[float, float]:
        self.net.train()
        loader = self.loader(self.task.train_set, self.epoch, True, start=self.batch_in_epoch)
        bar = tqdm(
            loader,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            leave=False,
            initial=self.batch_in_epoch,
            total=self.steps_per_epoch,
            disable=not (self.cfg.progress and self.info.is_main),
        )
        for x, y in bar:
            loss_sum, correct = self._train_step(*self._to_device(x, y))
            self.partial = [
                self.partial[0] + loss_sum,
                self.partial[1] + correct,
                self.partial[2] + len(y),
            ]
            self.batch_in_epoch += 1
            bar.set_postfix(loss=f"{self.partial[0] / self.partial[2]:.3f}")
            if self._stop_signal is not None:
                bar.close()
                self.save()
                raise Interrupted(
                    f"signal {self._stop_signal}: checkpoint saved at epoch "
                    f"{self.epoch + 1}, batch {self.batch_in_epoch}"
                )
        loss_sum, correct, count = all_reduce_sum(self.partial, self.info)
        return loss_sum / max(count, 1), correct / max(count, 1)

    @torch.no_grad()
    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy over ``dataset`` (summed over ranks)."""
        self.net.eval()
        sums, classes = [0.0, 0.0, 0.0, 0.0], 0
        for x, y in self.loader(dataset, 0, train=False):
            x, y = self._to_device(x, y)
            with self._autocast():
                logits = self.model(x).float()
            top1, top5 = accuracy_counts(logits, y)
            classes = logits.shape[1]
            loss = float(F.cross_entropy(logits, y, reduction="sum"))
            sums = [sums[0] + loss, sums[1] + top1, sums[2] + top5, sums[3] + len(y)]
        loss, top1, top5, n = all_reduce_sum(sums, self.info)
        n = max(n, 1)
        return {"loss": loss / n, "acc": top1 / n, "top5": top5 / n, "classes": classes}

    @torch.no_grad()
    def recalibrate_norms(self, batches: int) -> bool:
        """Re-estimate every BatchNorm's running mean and variance as the exact average over
        ``batches`` training batches (a fixed order), in train mode without gradients. Returns
        whether anything was recalibrated."""
        kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        norms = [m for m in self.model.modules() if isinstance(m, kinds)]
        if not batches or not norms:
            return False
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over the batches
        self.model.train()
        for i, (x, y) in enumerate(self.loader(self.task.train_set, self.cfg.epochs, True)):
            if i == batches:
                break
            with self._autocast():
                self.model(self._to_device(x, y)[0])
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        return True

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "callbacks": [call_hook(cb, "state_dict") or {} for cb in self.task.callbacks],
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "partial": list(self.partial),
            "history": self.history,
            "budget_history": self.budget_history,
            "rng": rng_state(),
            "config": self.config_dict,
        }

    def save(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.state_dict(), self.out / "checkpoint.pt")

    def load(self, path: str | Path) -> None:
        """Restore everything saved by :meth:`state_dict` (``--resume``)."""
        state = load_checkpoint(path, map_location=self.info.device)
        load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for cb, cb_state in zip(self.task.callbacks, state["callbacks"]):
            call_hook(cb, "load_state_dict", cb_state)
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.step, self.partial = state["step"], list(state["partial"])
        self.history, self.budget_history = state["history"], state["budget_history"]
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}")

    def _write_tables(self, table: pd.DataFrame) -> None:
        if not self.info.is_main:
            return
        write_atomic(self.out / "metrics.csv", pd.DataFrame(self.history).to_csv(index=False))
        write_atomic(
            self.out / "budget_history.csv", pd.DataFrame(self.budget_history).to_csv(index=False)
        )
        write_atomic(self.out / "budget.csv", table.to_csv(index=False))

    # ----------------------------------------------------------------------------- epochs
    def _end_epoch(self, train_loss: float, train_acc: float) -> None:
        val = self.evaluate(self.task.val_set)
        table = self.budget()
        tot = budget_mod.totals(table)
        row = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.cfg.lr * self.lr_factor(),
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "val_top5": val["top5"],
            "sparsity": tot["sparsity"],
            "nnz": tot["nnz"],
            "macs_sparse": tot["macs_sparse"],
        }
        for cb in self.task.callbacks:
            row.update(call_hook(cb, "on_epoch_end", self.model, self.epoch) or {})
        self.history.append(row)
        keep = ["name", "nnz", "sparsity", "threshold", "rank"]
        for r in budget_mod.layers(table)[keep].to_dict("records"):
            self.budget_history.append({"epoch": self.epoch + 1, **r})
        dead = budget_mod.dead_layers(table)
        extra = f" | {self.task.describe(table)}" if self.task.describe else ""
        self.log(
            f"epoch {self.epoch + 1}/{self.cfg.epochs}  loss {train_loss:.3f}  "
            f"train {100 * train_acc:.2f}%  val {100 * val['acc']:.2f}%  "
            f"sparsity {100 * tot['sparsity']:.2f}%{extra}"
        )
        if dead:
            self.log(f"warning: {len(dead)} layer(s) entirely zero: {', '.join(dead[:5])}")
        self.epoch, self.batch_in_epoch, self.partial = self.epoch + 1, 0, [0.0, 0.0, 0.0]
        self.save()
        self._write_tables(table)

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step."""

        def handler(signum, frame):
            self._stop_signal = signum

        try:
            old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread
            old = {}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        """Train for ``cfg.epochs`` (continuing a checkpoint when given); return the summary."""
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load(resume)
        self.log(describe_groups(self.groups))
        for cb in self.task.callbacks:
            call_hook(cb, "on_train_start", self.model, self.steps_per_epoch, self.cfg.epochs)
        start = time.perf_counter()
        with self._signals():
            while self.epoch < self.cfg.epochs:
                self._end_epoch(*self._train_epoch())
        if self.recalibrate_norms(self.cfg.bn_recalibration):
            self.save()
        return self.finish(time.perf_counter() - start)

    def finish(self, train_time: float | None = None) -> dict[str, Any]:
        """Final evaluation (val, and test when given) and summary.json."""
        table = self.budget()
        summary: dict[str, Any] = {"epochs": self.epoch, **budget_mod.totals(table)}
        val = self.evaluate(self.task.val_set)
        summary |= {"val_acc": val["acc"], "val_top5": val["top5"], "val_loss": val["loss"]}
        if self.task.test_set is not None:
            test = self.evaluate(self.task.test_set)
            summary |= {
                "test_acc": test["acc"],
                "test_top5": test["top5"],
                "test_loss": test["loss"],
            }
        if self.task.summarize is not None:
            summary |= self.task.summarize(table)
        notes = budget_warnings(table, val["acc"], val["classes"], self.cfg, self.step)
        for line in notes:
            self.log(line)
        if notes:
            summary["warnings"] = notes
        if train_time is not None:
            summary["train_time_s"] = round(train_time, 2)
        if self.info.enabled:
            summary["world_size"] = self.info.world_size
            summary["replicas_in_sync"] = replicas_in_sync(self.model, self.info)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            write_atomic(self.out / "budget.csv", table.to_csv(index=False))
        return summary
