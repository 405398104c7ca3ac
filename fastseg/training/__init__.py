"""The reference 3D U-Net workflow: :class:`Trainer`, :class:`Predictor`, and the main job :func:`run_demo`."""
from fastseg.training.checkpoint import load_checkpoint, save_checkpoint
from fastseg.training.config import TrainConfig
from fastseg.training.predictor import Predictor
from fastseg.training.trainer import Trainer, TrainingInterrupted

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "Predictor", "load_checkpoint", "save_checkpoint"]
