"""Settings of EAGLE-3 head training and of the built-in training-data recipe, validated once by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Held-out prompts per language that benchmarks and `hsd-rag eval-head` judge with (the first ones of the
# held-out split); acceptance priors are measured on the prompts after them, and no training recipe uses either.
JUDGED_HELDOUT_PROMPTS = 50

DType = Literal["float32", "bfloat16", "float16"]


class TrainConfig(BaseModel):
    """Everything `train_head` needs besides the target and the conversations."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    output_dir: Path = Path("eagle3-head")
    """Where the trained head (`config.json` + `model.safetensors`), checkpoints and the feature cache go."""
    steps: int | None = Field(None, gt=0)
    """Optimizer steps; None derives them from `epochs` (steps = ceil(epochs * train conversations / batch))."""
    epochs: float = Field(3.0, gt=0)
    """Passes over the training conversations when `steps` is None."""
    batch_size: int = Field(1, gt=0)
    """Conversations per optimizer step (right-padded into one batch)."""
    max_seq_len: int = Field(2048, gt=1)
    """Longest prompt + answer (in target tokens) kept; longer conversations keep the end of their prompt."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate. The reference's 5e-5 is for 8B-scale heads trained on ~100k conversations; a small
    head trained for a few thousand steps on a few hundred conversations needs a larger one."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2), as in the reference."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warm-up from 0 to `lr`; afterwards cosine decay to `min_lr_ratio * lr` at the last step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""
    grad_clip: float = Field(0.5, gt=0)
    """Maximum global gradient norm (the reference's 0.5)."""
    ttt_steps: int = Field(7, gt=0)
    """Training-time test unroll depth K: the head predicts K tokens ahead, feeding back its own outputs."""
    ttt_decay: float = Field(0.8, gt=0, le=1)
    """Loss weight of unroll step j is `ttt_decay ** j` (the reference's 0.8)."""
    prompt_chains: int = Field(32, ge=0)
    """Unrolls started inside the prompt per conversation (random starts, fixed per conversation): the target's
    own next-token distribution is known at every prompt position too, and RAG prompts are ~10x longer than
    their answers, so these extra self-distillation rows multiply the supervision of a small data set. 0 trains
    on answer tokens only, as the reference does. Measured for the shipped head (docs/TRAINING.md): held-out
    τ(eagle, 16) 1.82 / 2.03 / 2.15 with 4 / 16 / 32 chains."""
    prompt_weight: float = Field(0.5, ge=0)
    """Loss weight of a prompt-chain row relative to an answer row."""
    draft_vocab_size: int | None = Field(8192, gt=0)
    """Draft vocabulary size (most frequent target tokens of the training answers); None = the whole target
    vocabulary. docs/TRAINING.md gives the coverage measured for the default model."""
    init_from_target: bool = True
    """Start the head's `lm_head` (draft-vocabulary rows) and final `norm` from the target's own, so the head
    only has to learn to produce a target-like last hidden state; False = PyTorch's default initialisation."""
    init_head: str | None = None
    """Start from this EAGLE-3 head (folder, hub id or "auto" = the head shipped for the default target; trained
    for the same target) instead of a fresh one: its layer, `fc` and norms are copied, and the `lm_head` rows of
    tokens both draft vocabularies hold (the others mapped from the target's rows, see `warm_start.py`). How to
    teach a trained head new data or languages without starting over."""
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    """Fraction of the conversations held out from training for evaluation (loss and top-1 accuracy per depth)."""
    eval_every: int = Field(200, gt=0)
    """Evaluate every this many steps (and at the end)."""
    checkpoint_every: int = Field(200, gt=0)
    """Write a resumable checkpoint (head, optimizer, scheduler, step, RNG) every this many steps."""
    resume: bool = True
    """Continue from the newest checkpoint in `output_dir/checkpoints` when there is one."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many of the newest checkpoints to keep on disk."""
    cache_features: bool = True
    """Store target features and teacher logits on disk (half precision) so later epochs and reruns skip the
    target forward; False recomputes them for every batch."""
    feature_dtype: Literal["bfloat16", "float16"] = "float16"
    """Precision of cached features and teacher logits."""
    seed: int = 0
    """Seed of initialisation, data order and the eval split."""
    device: str | None = None
    """Device of the head and the target forward; None = the target's device."""
    dtype: DType | None = None
    """Parameter dtype of the head while training; None = float32 (master weights). On CUDA the forward runs
    under bfloat16 autocast."""
    save_dtype: DType = "bfloat16"
    """Dtype of the exported head weights (`load_head` casts them to the target's dtype)."""
    log_every: int = Field(10, gt=0)
    """Refresh the progress bar's loss / accuracy every this many steps."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class RecipeConfig(BaseModel):
    """The built-in offline training data: RAG prompts of the train split plus general instructions, all answered
    by the target itself (greedy) so the head learns the target's own distribution."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    languages: list[Literal["en", "fr", "es"]] = ["en"]
    """Built-in RAG prompt sets to use (train side of the held-out split only)."""
    rag_limit: int | None = Field(None, ge=0)
    """At most this many RAG prompts per language (None = the whole train side)."""
    n_docs: int = Field(3, gt=0)
    """Passages per RAG prompt (the gold one plus BM25 distractors), as in the benchmarks."""
    general_wiki: int = Field(40, ge=0)
    """General instructions templated from Wikipedia lead sections (summaries, explanations, lists of facts);
    articles that answer held-out benchmark questions are skipped."""
    general_pydoc: int = Field(16, ge=0)
    """General instructions about Python built from `pydoc_data.topics`."""
    copy_passages: int = Field(0, ge=0)
    """Per language, instructions to copy a gold passage of the train side word for word (answers that are
    mostly copying: RAG answers copy their documents, and a head learns that slowly from RAG answers alone)."""
    max_new_tokens: int = Field(128, gt=0)
    """Longest generated answer."""
    budget: int = Field(8, ge=0)
    """Draft budget of the n-gram decoder that generates the answers (output identical to plain greedy)."""
    seed: int = 0
    """Seed of the instruction sampling."""
    cache: Path | None = None
    """jsonl file of generated answers; None = `<hsd_rag cache>/training/<target>-answers.jsonl`. Existing
    records are reused, so a rerun only generates what is missing."""
