"""Training: corpus + tokenizer (data, tokenizer), target LM training (train), drafter distillation (distill).

CLI: `gdnspec data|train|distill` (gdnspec/cli.py). The shipped checkpoints and their commands: notes/training.md.
"""
from gdnspec.train.data import Document, TokenData, build_dataset, collect_documents, split_documents
from gdnspec.train.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer
from gdnspec.train.train import PRESETS, TrainConfig, lm_train_forward, make_config, train_lm

__all__ = ["Document", "EOS_TOKEN", "PRESETS", "TokenData", "TrainConfig", "build_dataset", "collect_documents",
           "lm_train_forward", "load_tokenizer", "make_config", "split_documents", "train_lm", "train_tokenizer"]
