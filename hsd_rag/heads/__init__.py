"""EAGLE draft heads (EAGLE-3 and EAGLE-1/2), official checkpoint IO, and target feature capture hooks."""

from __future__ import annotations

from hsd_rag.heads.attention import HeadKVCache
from hsd_rag.heads.base import DraftHead, HeadOutput, head_config
from hsd_rag.heads.checkpoint import HeadCheckpointError, load_head, save_head
from hsd_rag.heads.eagle1 import Eagle1Head
from hsd_rag.heads.eagle3 import Eagle3Head
from hsd_rag.heads.features import FeatureCapture, eagle3_feature_layers

__all__ = [
    "DraftHead",
    "Eagle1Head",
    "Eagle3Head",
    "FeatureCapture",
    "HeadCheckpointError",
    "HeadKVCache",
    "HeadOutput",
    "eagle3_feature_layers",
    "head_config",
    "load_head",
    "save_head",
]
