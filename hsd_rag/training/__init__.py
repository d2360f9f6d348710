"""EAGLE-3 head training: data (jsonl or the built-in offline recipe, answered by the target), draft vocabulary,
target features, and the training-time-test loop. docs/TRAINING.md explains the method and the shipped head."""

from hsd_rag.training.api import export_head, train_head
from hsd_rag.training.config import RecipeConfig, TrainConfig
from hsd_rag.training.data import Conversation, answer_missing, build_recipe_data, load_conversations

__all__ = [
    "Conversation",
    "RecipeConfig",
    "TrainConfig",
    "answer_missing",
    "build_recipe_data",
    "export_head",
    "load_conversations",
    "train_head",
]
