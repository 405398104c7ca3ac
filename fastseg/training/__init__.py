"""The reference 3D U-Net workflow: :class:`Trainer`, :class:`Predictor`, the two-stage cascade
(:class:`CascadeTrainer`, :class:`CascadePredictor`), and the main job :func:`fastseg.training.demo.run_demo`."""
from fastseg.training.cascade import CascadePredictor, CascadeTrainer, load_predictor
from fastseg.training.checkpoint import load_checkpoint, save_checkpoint
from fastseg.training.config import TrainConfig
from fastseg.training.predictor import Predictor, ProbabilityBox
from fastseg.training.trainer import Trainer, TrainingInterrupted

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "Predictor", "ProbabilityBox", "CascadeTrainer",
           "CascadePredictor", "load_predictor", "load_checkpoint", "save_checkpoint"]
