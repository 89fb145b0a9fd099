"""LoRA fine-tuning on kept samples and the adapter store."""

from raft_stream.training.lora_trainer import LoRATrainer, TrainResult
from raft_stream.training.store import AdapterStore

__all__ = ["AdapterStore", "LoRATrainer", "TrainResult"]
