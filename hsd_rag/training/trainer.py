"""The training loop: AdamW, warm-up + cosine decay, gradient clipping, resumable checkpoints, held-out evaluation.

Data order is a pure function of (seed, step): batch `s` of process `r` takes items (s * world + r) * B ..
of a per-epoch permutation, so a resumed run sees exactly the batches the interrupted one would have. A
checkpoint holds the head, optimizer, scheduler, step and every RNG state.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hsd_rag.heads.eagle3 import Eagle3Head
from hsd_rag.heads.features import final_norm
from hsd_rag.training.batches import collate
from hsd_rag.training.config import TrainConfig
from hsd_rag.training.features import FeatureStore
from hsd_rag.training.loss import DepthStats, ttt_loss
from hsd_rag.training.runtime import Runtime
from hsd_rag.training.ttt import UnrolledHead
from hsd_rag.training.warm_start import warm_start

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_GLOB = "step-*.pt"
SCALE_SAMPLES = 64  # training samples whose features set the per-dimension feature scale
MIN_FEATURE_SCALE = 1e-3  # floor of a dimension's scale (a dead dimension must not divide by ~0)


@dataclass
class Item:
    """One training conversation in target tokens."""

    id: str
    input_ids: list[int]
    answer_start: int


def init_head(model, draft_to_target: torch.Tensor, config: TrainConfig) -> Eagle3Head:
    """A head for `model` with the given draft vocabulary, fresh or warm-started (`TrainConfig.init_from_target`,
    `TrainConfig.init_head`)."""
    torch.manual_seed(config.seed)
    head = Eagle3Head.from_target(model, draft_vocab_size=int(draft_to_target.numel()))
    dtype = getattr(torch, config.dtype) if config.dtype else torch.float32
    head = head.to(dtype=dtype)
    if config.device is not None:
        head = head.to(config.device)
    head.set_vocab_map(draft_to_target)
    if config.init_from_target:
        with torch.no_grad():
            rows = draft_to_target.to(model.get_output_embeddings().weight.device)
            head.lm_head.weight.copy_(model.get_output_embeddings().weight[rows])
            head.norm.weight.copy_(final_norm(model).weight)
    if config.init_head is not None:
        warm_start(head, config.init_head, model.get_output_embeddings().weight)
    return head


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Trains `head` on `train` items (features from `store`) and evaluates on `eval_items`."""

    def __init__(
        self,
        head: Eagle3Head,
        store: FeatureStore,
        train: list[Item],
        eval_items: list[Item],
        config: TrainConfig,
        progress: bool = True,
    ):
        if not train:
            raise ValueError(
                "No training conversations (every one was held out for evaluation or was empty)."
            )
        self.config = config
        self.store = store
        self.train_items = train
        self.eval_items = eval_items
        self.runtime = Runtime(head.device)
        self.progress = progress and self.runtime.is_main
        self.head = head.to(self.runtime.device)
        per_step = config.batch_size * self.runtime.world
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * len(train) / per_step))
        self.unrolled = UnrolledHead(self.head)
        optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, config, self.total_steps)
        )
        self.model, self.optimizer = self.runtime.prepare(self.unrolled, optimizer)
        self.step = 0
        self.history: list[dict] = []  # one record per evaluation
        self.train_s = 0.0  # wall time spent in training steps, over all resumed runs

    # ---- data ----------------------------------------------------------------------------------------------

    def batch_items(self, step: int) -> list[Item]:
        """The items of `step` for this process (a pure function of seed and step)."""
        size = self.config.batch_size
        count = len(self.train_items)
        first = (step * self.runtime.world + self.runtime.rank) * size
        items = []
        for position in range(first, first + size):
            epoch, index = divmod(position, count)
            items.append(self.train_items[self._permutation(epoch)[index]])
        return items

    def _permutation(self, epoch: int) -> list[int]:
        cached = getattr(self, "_perm", None)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.train_items), generator=generator).tolist())
        return self._perm[1]

    def precompute(self) -> None:
        """Fill the feature cache for this process's share of every item (one target forward each)."""
        if self.store.directory is None:
            return
        items = [*self.train_items, *self.eval_items][self.runtime.rank :: self.runtime.world]
        todo = [item for item in items if not self.store.cached(item.input_ids, item.answer_start)]
        for item in tqdm(todo, desc="target features", disable=not self.progress or not todo):
            self.store.get(item.input_ids, item.answer_start)
        self.runtime.wait()

    @torch.no_grad()
    def estimate_feature_scale(self) -> torch.Tensor:
        """Per-dimension RMS of the target features over (up to) SCALE_SAMPLES training conversations."""
        total, count = None, 0
        for item in self.train_items[:SCALE_SAMPLES]:
            features = self.store.get(item.input_ids, item.answer_start).features.double()
            squares = features.pow(2).sum(0)
            total = squares if total is None else total + squares
            count += features.shape[0]
        return (total / count).sqrt().clamp(min=MIN_FEATURE_SCALE).float()

    def set_feature_scale(self) -> None:
        """Precondition the features of a run that starts now (not resumed) by their measured scale."""
        self.unrolled.feature_scale.copy_(self.estimate_feature_scale())
        if self.config.init_head is not None:  # a saved head reads raw features: move it onto the scaled ones
            self.unrolled.unfold_feature_scale()

    def _batch(self, items: list[Item]):
        samples = [self.store.get(item.input_ids, item.answer_start) for item in items]
        feature_dtype = self.head.fc.weight.dtype
        return collate(samples, self.config.ttt_steps).to(self.runtime.device, feature_dtype)

    # ---- one step ------------------------------------------------------------------------------------------

    def _loss(self, model, batch) -> tuple[torch.Tensor, DepthStats]:
        with self.runtime.autocast():
            logits = model(batch.features, batch.input_ids, batch.rows, batch.query_positions)
        return ttt_loss(
            logits,
            batch.steps,
            self.head.d2t,
            self.head.t2d,
            self.config.ttt_decay,
            self.config.prompt_weight,
        )

    def train_step(self) -> tuple[float, DepthStats]:
        self.model.train()
        batch = self._batch(self.batch_items(self.step))
        loss, stats = self._loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.runtime.backward(loss)
        self.runtime.clip(self.head.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach()), stats

    @torch.no_grad()
    def evaluate(self) -> DepthStats:
        """Loss sums and top-1 hits per depth over the held-out items (sharded over processes)."""
        model = self.runtime.unwrap(self.model)
        model.eval()
        total = DepthStats()
        for start in range(
            self.runtime.rank * self.config.batch_size,
            len(self.eval_items),
            self.config.batch_size * self.runtime.world,
        ):
            batch = self._batch(self.eval_items[start : start + self.config.batch_size])
            total.add(self._loss(model, batch)[1])
        depth = self.config.ttt_steps
        sums = self.runtime.sum(
            [
                *_padded(total.loss, depth),
                *_padded(total.counted, depth),
                *_padded(total.correct, depth),
                *_padded(total.rows, depth),
            ]
        )
        return DepthStats(*(list(sums[i * depth : (i + 1) * depth]) for i in range(4)))

    # ---- loop ----------------------------------------------------------------------------------------------

    def fit(self) -> Eagle3Head:
        config = self.config
        resumed = config.resume and self.load_latest()
        self.precompute()
        if not resumed:
            self.set_feature_scale()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training head", disable=not self.progress)
        window, losses = DepthStats(), []
        while self.step < self.total_steps:
            started = time.perf_counter()
            loss, stats = self.train_step()
            self.train_s += time.perf_counter() - started
            window.add(stats)
            losses.append(loss)
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                accuracy = "/".join(f"{a:.2f}" for a in window.accuracy())
                bar.set_postfix(
                    loss=f"{sum(losses) / len(losses):.3f}",
                    acc=accuracy,
                    lr=f"{self.scheduler.get_last_lr()[0]:.1e}",
                )
                window, losses = DepthStats(), []
            if self.eval_items and (self.step % config.eval_every == 0 or self.step == self.total_steps):
                self._record_eval()
            if self.step % config.checkpoint_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.unrolled.fold_feature_scale()  # the returned head reads raw target features
        return self.head

    def _record_eval(self) -> None:
        stats = self.evaluate()
        record = {
            "step": self.step,
            "train_s": round(self.train_s, 1),
            "eval_loss": round(stats.weighted_loss(self.config.ttt_decay), 4),
            "eval_loss_by_depth": [round(x, 4) for x in stats.mean_loss()],
            "eval_top1_by_depth": [round(x, 4) for x in stats.accuracy()],
        }
        self.history.append(record)
        if self.progress:
            tqdm.write(
                f"eval @ {self.step}: loss {record['eval_loss']}, top-1 by depth "
                + " ".join(f"{a:.3f}" for a in record["eval_top1_by_depth"])
            )

    # ---- checkpoints ---------------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path | None:
        self.runtime.wait()
        if not self.runtime.is_main:
            return None
        state = {
            "step": self.step,
            "head": self.head.state_dict(),
            "feature_scale": self.unrolled.feature_scale.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "train_s": self.train_s,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{self.step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        for old in sorted(self.checkpoint_dir.glob(CHECKPOINT_GLOB))[: -self.config.keep_checkpoints]:
            old.unlink()
        return path

    def load_latest(self) -> bool:
        """Resume from the newest checkpoint, if any; False when starting fresh."""
        paths = sorted(self.checkpoint_dir.glob(CHECKPOINT_GLOB))
        if not paths:
            return False
        state = torch.load(paths[-1], map_location="cpu", weights_only=False)
        if not torch.equal(state["head"]["d2t"], self.head.d2t.cpu()):
            raise ValueError(
                f"The checkpoint {paths[-1]} was trained with another draft vocabulary (different data or "
                "draft_vocab_size): use a new output_dir or pass resume=False."
            )
        self.head.load_state_dict(state["head"])
        self.unrolled.feature_scale.copy_(state["feature_scale"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.history = state.get("history", [])
        self.train_s = state.get("train_s", 0.0)
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        return True


def _padded(values: list, length: int) -> list[float]:
    return [float(v) for v in values] + [0.0] * (length - len(values))
