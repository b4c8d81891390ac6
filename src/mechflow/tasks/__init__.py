"""Task datasets (IOI, factual recall, greater-than, user JSONL), their metrics and baselines."""

from mechflow.tasks.baseline import final_logits, score_dataset, summarize
from mechflow.tasks.config import KINDS, TaskConfig, parse_task_config
from mechflow.tasks.core import build_task, evaluate_task, prepare_task
from mechflow.tasks.dataset import TaskBatch, TaskDataset, TaskItem, make_batch, meta_path_of, select_batch
from mechflow.tasks.tokenization import TaskTokenizer, load_tokenizer

__all__ = [
    "KINDS", "TaskBatch", "TaskConfig", "TaskDataset", "TaskItem", "TaskTokenizer", "build_task", "evaluate_task",
    "final_logits", "load_tokenizer", "make_batch", "meta_path_of", "parse_task_config", "prepare_task",
    "score_dataset", "select_batch", "summarize",
]
