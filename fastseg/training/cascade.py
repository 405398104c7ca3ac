"""Two-stage cascade: large organs at a coarse spacing first, then the small ones at full resolution inside a
crop around stage one's prediction.

Small organs (lens, cochlea, optic nerve: a few voxels at 1 x 1 x 2.5 mm) are where single-stage models fail
(Tappeiner, Welk & Schubert 2022, who discuss cascades for them); nnU-Net's 3D cascade (Isensee et al.,
Nature Methods 2021) feeds the first stage's segmentation to the second as extra channels. Here:

* the organ split is by measured volume (median over the training cases, in ml, below
  ``TrainConfig.cascade_max_volume_ml``) unless ``cascade_small_organs`` names the small organs;
* stage one is an ordinary :class:`~fastseg.training.Trainer` on every organ at ``cascade_coarse_spacing``
  (default twice the target spacing), in ``<output_dir>/stage1``;
* stage two sees, per case, one crop: the box of the voxels stage one labels as a small organ, grown by
  ``cascade_margin_mm``; its inputs are the CT and stage one's probability of each small organ (resampled to
  the target spacing); its classes are background + the small organs. It is in ``<output_dir>/stage2``;
* ``<output_dir>/model_final.pt`` holds both stages. Its top-level ``plan`` / ``model`` are stage one's, so a
  plain :class:`~fastseg.training.Predictor` reads it as the coarse all-organ model; :func:`load_predictor`
  gives the :class:`CascadePredictor`, which chains both stages into one label map.

Both stages preprocess the same body crop of a case (:func:`~fastseg.data.preprocess.preprocess_case` crops
before it resamples, and the crop does not depend on the spacing), so the coarse and the fine grids cover the
same extent and map onto each other by their shapes alone.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastseg import _atomic
from fastseg.training.checkpoint import load_checkpoint, save_checkpoint
from fastseg.training.config import TrainConfig
from fastseg.training.predictor import Predictor
from fastseg.training.trainer import (FINAL, PreparedCase, Trainer, build_model, lateral_axis_of, load_dataset,
                                      median_spacing, predict_logits, prepare_cases)

__all__ = ["CascadePredictor", "CascadeTrainer", "cascade_crop", "load_predictor", "measure_volumes",
           "split_organs"]

STAGES = ("stage1", "stage2")
Box = Tuple[slice, ...]


# --------------------------------------------------------------------------------------------------------
# The organ split
# --------------------------------------------------------------------------------------------------------
def measure_volumes(cases: Sequence[Any], label_values: Mapping[str, int]) -> Dict[str, float]:
    """Median volume (ml) of each organ over the raw cases (``fastseg.data.dataset.Case``) where it is present;
    NaN for an organ present in none. Cases where an organ is cut off by the field of view do not pull its
    median towards zero."""
    per_organ: Dict[str, List[float]] = {organ: [] for organ in label_values}
    top = max(label_values.values())
    for case in cases:
        label = np.asarray(case.label.array)
        counts = np.bincount(label.ravel().astype(np.int64), minlength=top + 1)
        voxel_ml = float(np.prod(case.label.spacing)) / 1000.0
        for organ, value in label_values.items():
            if counts[value]:
                per_organ[organ].append(float(counts[value]) * voxel_ml)
    return {organ: float(np.median(v)) if v else math.nan for organ, v in per_organ.items()}


def split_organs(volumes_ml: Mapping[str, float], max_volume_ml: float,
                 override: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """``(large, small)`` organ names, each in the order of ``volumes_ml``.

    Args:
        volumes_ml: organ -> median volume (ml); NaN (never present) counts as large.
        max_volume_ml: organs below it are small.
        override: the small organs by name (``TrainConfig.cascade_small_organs``); the volumes are then unused.
    """
    organs = list(volumes_ml)
    if override is not None:
        unknown = [o for o in override if o not in volumes_ml]
        if unknown:
            raise ValueError(f"split_organs: override (cascade_small_organs): expected organs of the dataset "
                             f"{organs}, got unknown {unknown}")
        small = [o for o in organs if o in set(override)]
        if not small:
            raise ValueError("split_organs: override (cascade_small_organs): expected at least one organ name, "
                             "got none")
    else:
        small = [o for o in organs if volumes_ml[o] < max_volume_ml]
        if not small:
            measured = {o: v for o, v in volumes_ml.items() if not math.isnan(v)}
            smallest = min(measured, key=measured.get) if measured else None
            detail = f"the smallest is {smallest} with {measured[smallest]:.3g} ml" if smallest else \
                "no organ occurs in the training cases"
            raise ValueError(f"split_organs: max_volume_ml (cascade_max_volume_ml): expected a volume above the "
                             f"median volume of some organ, got {max_volume_ml} ml ({detail}); raise it or name "
                             f"the small organs in cascade_small_organs")
    return [o for o in organs if o not in small], small


def coarse_spacing(config: TrainConfig, target: Sequence[float]) -> List[float]:
    """Stage one's spacing: ``cascade_coarse_spacing``, or twice the target spacing."""
    if config.cascade_coarse_spacing is None:
        return [2.0 * float(s) for s in target]
    coarse = [float(s) for s in config.cascade_coarse_spacing]
    if len(coarse) != len(target):
        raise ValueError(f"TrainConfig: cascade_coarse_spacing: expected {len(target)} values (the data is "
                         f"{len(target)}D), got {coarse}")
    if any(c < t for c, t in zip(coarse, target)):
        raise ValueError(f"TrainConfig: cascade_coarse_spacing: expected a spacing at least as coarse as the target "
                         f"spacing {list(target)} on every axis, got {coarse}")
    return coarse


# --------------------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------------------
def _bbox(mask: np.ndarray) -> Optional[Box]:
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def _to_fine(box: Box, coarse_shape: Sequence[int], fine_shape: Sequence[int]) -> Box:
    """A box of coarse voxels -> the fine voxels whose extent it covers (both grids span the same extent)."""
    return tuple(slice((s.start * f) // c, -((-s.stop * f) // c)) for s, c, f in zip(box, coarse_shape, fine_shape))


def _grow(box: Box, margin_mm: float, spacing: Sequence[float], shape: Sequence[int]) -> Box:
    pad = [math.ceil(margin_mm / float(s)) for s in spacing]
    return tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, shape))


def _union(a: Box, b: Box) -> Box:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def cascade_crop(stage_one_probs: np.ndarray, small_channels: Sequence[int], fine_shape: Sequence[int],
                 spacing: Sequence[float], margin_mm: float, truth: Optional[np.ndarray] = None
                 ) -> Tuple[Box, bool]:
    """Stage two's crop on the fine grid, and whether stage one found a small organ.

    Args:
        stage_one_probs: (K, *coarse) stage-one class probabilities (channel 0 background).
        small_channels: the channels of the small organs.
        fine_shape: the fine (target-spacing) grid, covering the same extent as the coarse one.
        spacing: the fine grid's spacing (mm), for the margin.
        margin_mm: added on every side of the box of stage one's small-organ voxels.
        truth: (*fine_shape) bool mask of the ground-truth small organs (training crops): the box is widened
            to contain it.

    Returns:
        ``(box, found)``; when stage one labels no voxel as a small organ the box is the whole grid (found
        False), so nothing is cropped away on stage one's word alone.
    """
    predicted = np.isin(stage_one_probs.argmax(0), list(small_channels))
    box = _bbox(predicted)
    if box is None:
        return tuple(slice(0, n) for n in fine_shape), False
    box = _grow(_to_fine(box, predicted.shape, fine_shape), margin_mm, spacing, fine_shape)
    if truth is not None:
        true_box = _bbox(truth)
        if true_box is not None:
            box = _union(box, true_box)
    return box, True


def _resample_probs(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(C, *coarse) probabilities -> (C, *shape), linear: weights sum to one, so per-voxel sums are kept."""
    from fastseg.data.preprocess import resample_to_shape

    return resample_to_shape(probs, tuple(shape), order=1)


def _stage_two_input(fine_image: np.ndarray, stage_one_probs: np.ndarray, small_channels: Sequence[int],
                     box: Box) -> np.ndarray:
    """(1 + n_small, *box): the CT and stage one's probability of each small organ, on the fine grid."""
    guidance = _resample_probs(stage_one_probs[list(small_channels)], fine_image.shape[1:])
    return np.ascontiguousarray(np.concatenate([fine_image, guidance])[(slice(None),) + box], dtype=np.float32)


def _combine(stage_one_fine: np.ndarray, stage_two: np.ndarray, box: Box, small_channels: Sequence[int]) -> np.ndarray:
    """(K, *fine) cascade probabilities, in place of ``stage_one_fine``.

    Stage one's small-organ probabilities are dropped everywhere and its other channels renormalised to q.
    Outside the crop the cascade is q (stage two's "no small organ" has probability one there); inside it,
    small organ j gets stage two's p_j and every other class p_0 * q, p_0 being stage two's "no small organ".
    The channels sum to one, and the small organs come from stage two alone."""
    small = list(small_channels)
    rest = [c for c in range(stage_one_fine.shape[0]) if c not in set(small)]
    q = stage_one_fine[rest]
    total = q.sum(0, keepdims=True)
    # where stage one put all its mass on small organs (softmax underflow), "not small" means background
    q[0] = np.where(total[0] > 0, q[0], 1.0)
    q /= np.where(total > 0, total, 1.0)
    q[(slice(None),) + box] *= stage_two[:1]
    stage_one_fine[rest] = q
    stage_one_fine[small] = 0.0
    stage_one_fine[(small,) + box] = stage_two[1:]
    return stage_one_fine


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------
class CascadeTrainer:
    """Trains the two stages of the cascade (see the module docstring); the settings are a
    :class:`TrainConfig` with ``cascade=True``.

    Example:
        >>> result = CascadeTrainer(TrainConfig(dataset="phantom/dataset.json", output_dir="runs/c",
        ...                                     cascade=True)).fit()
        >>> result["small_organs"], result["checkpoint"]     # runs/c/model_final.pt: both stages
    """

    def __init__(self, config: TrainConfig, *, resume: bool = True, progress: bool = True):
        if not config.cascade:
            raise ValueError("CascadeTrainer: config: expected cascade: true, got cascade: false (use Trainer)")
        self.config = config
        self.out = Path(config.output_dir)
        self.resume = resume
        self.progress = progress

    def _stage_config(self, stage: str, spacing: Sequence[float]) -> TrainConfig:
        return self.config.replace(output_dir=str(self.out / stage), target_spacing=[float(s) for s in spacing],
                                   cascade=False)

    def _log(self, message: str) -> None:
        if self.progress:
            print(f"[cascade] {message}", file=sys.stderr, flush=True)

    def fit(self) -> Dict[str, Any]:
        """Trains stage one, then stage two on its crops; each resumes from its own checkpoint. Returns the
        organ split, both stages' results and the path of the final two-stage file."""
        cfg = self.config
        loaded = load_dataset(cfg)
        spec, train_raw, val_raw = loaded
        target = cfg.target_spacing or median_spacing(train_raw)
        coarse = coarse_spacing(cfg, target)
        volumes = measure_volumes(train_raw, spec.label_values)
        large, small = split_organs(volumes, cfg.cascade_max_volume_ml, cfg.cascade_small_organs)
        self._log(f"small organs (stage two, {target} mm): {small}; stage one: every organ at {coarse} mm")

        stage1 = Trainer(self._stage_config(STAGES[0], coarse), resume=self.resume, progress=self.progress)
        stage1.prepare_data(loaded)
        result1 = stage1.fit()

        organs = list(stage1.plan["organs"])
        channels = [organs.index(o) + 1 for o in small]
        stage2 = Trainer(self._stage_config(STAGES[1], target), resume=self.resume,
                                  progress=self.progress)
        self._log("stage one's predictions of the training and validation cases -> stage two's crops")
        crops: List[Dict[str, Any]] = []
        cases = {}
        for part, raw, coarse_cases in (("train", train_raw, stage1.train_cases), ("val", val_raw, stage1.val_cases)):
            fine_cases = prepare_cases(raw, target, cfg.window, list(spec.label_values.values()))
            cases[part] = [self._crop_case(stage1, c, f, spec.label_values, small, channels, target, part, crops)
                           for c, f in zip(coarse_cases, fine_cases)]
        stage2.use_cases(cases["train"], cases["val"], target, organs=small,
                         label_values={o: j + 1 for j, o in enumerate(small)}, in_channels=1 + len(small),
                         lateral=lateral_axis_of(train_raw))
        # marks a stage-two file (its inputs need stage one, so load_predictor refuses it on its own) and keeps
        # the intensity augmentation off the guidance channels (Trainer._augmenter)
        stage2.plan = {**stage2.plan, "cascade_guidance": list(small)}
        result2 = stage2.fit()

        final = self._save(stage1, stage2, large, small, volumes)
        if stage1.rank == 0:
            _atomic.write_text(self.out / "cascade.json", json.dumps(
                {"small_organs": small, "large_organs": large, "volumes_ml": _json_volumes(volumes),
                 "coarse_spacing": coarse, "target_spacing": [float(s) for s in target],
                 "margin_mm": cfg.cascade_margin_mm, "crops": crops}, indent=1))
        return {"checkpoint": final, "small_organs": small, "large_organs": large, "volumes_ml": volumes,
                "stage1": result1, "stage2": result2}

    def _crop_case(self, stage1: Trainer, coarse: PreparedCase, fine: PreparedCase, label_values: Mapping[str, int],
                   small: List[str], channels: List[int], spacing: Sequence[float], part: str,
                   log: List[Dict[str, Any]]) -> PreparedCase:
        # Stage one predicts its own training cases here, so its guidance is better than on unseen images and
        # stage two may learn to trust it too much; nnU-Net avoids that with 5-fold cross-validation
        # predictions, at five times stage one's training cost. We keep one stage one and instead make sure of
        # what matters most: training crops are widened to every ground-truth small organ, so stage two always
        # learns on complete organs even where stage one missed them. Validation crops are stage one's alone,
        # as at prediction time.
        probs = torch.softmax(stage1.predict_logits(coarse.image), 0).numpy()
        lut = np.zeros(len(label_values) + 1, np.uint8)  # fine.label holds class indices 1..K (prepare_cases)
        lut[channels] = np.arange(1, len(small) + 1)
        target = lut[fine.label]
        box, found = cascade_crop(probs, channels, target.shape, spacing, self.config.cascade_margin_mm,
                                  truth=target > 0 if part == "train" else None)
        if not found:
            warnings.warn(f"cascade: stage one predicts no small organ in {part} case {fine.name!r}; stage two "
                          "uses its whole body-cropped volume", stacklevel=2)
        log.append({"case": fine.name, "split": part, "found": found,
                    "box": [[s.start, s.stop] for s in box], "shape": list(target.shape)})
        return PreparedCase(fine.name, _stage_two_input(fine.image, probs, channels, box),
                            np.ascontiguousarray(target[box]))

    def _save(self, stage1: Trainer, stage2: Trainer, large: List[str], small: List[str],
              volumes: Mapping[str, float]) -> Path:
        path = self.out / FINAL
        if stage1.rank == 0:
            save_checkpoint({
                "config": self.config.to_dict(), "plan": stage1.plan, "model": stage1.model.state_dict(),
                "cascade": {"small_organs": small, "large_organs": large, "volumes_ml": dict(volumes),
                            "margin_mm": float(self.config.cascade_margin_mm), "plan": stage2.plan,
                            "model": stage2.model.state_dict()},
            }, path)
        return path


def _json_volumes(volumes: Mapping[str, float]) -> Dict[str, Optional[float]]:
    return {o: None if math.isnan(v) else v for o, v in volumes.items()}


# --------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------
class CascadePredictor(Predictor):
    """Segments images with both stages of a cascade's ``model_final.pt``; the same arguments and outputs as
    :class:`Predictor` (one label map in the input's geometry; probabilities over background + every organ).

    Stage one runs on the coarse grid; stage two at the target spacing inside the box of stage one's
    small-organ voxels grown by the training margin (the whole body crop, with a warning, when stage one
    finds none). Large organs come from stage one, small organs from stage two (see :func:`_combine`).
    """

    def __init__(self, checkpoint: Union[str, Path, Dict], **kwargs: Any):
        state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
        if "cascade" not in state:
            where = "" if isinstance(checkpoint, dict) else f" '{checkpoint}'"
            raise ValueError(f"CascadePredictor: checkpoint: expected a cascade's model_final.pt (fastseg train "
                             f"--cascade), got a single-stage model{where} (use Predictor)")
        super().__init__(state, **kwargs)
        cascade = state["cascade"]
        self.small_organs = list(cascade["small_organs"])
        self.margin_mm = float(cascade["margin_mm"])
        self.stage2_plan = cascade["plan"]
        self.stage2_model = build_model(self.stage2_plan)
        self.stage2_model.load_state_dict(cascade["model"])
        self.stage2_model.to(self.device).eval()
        self.small_channels = [self.organs.index(o) + 1 for o in self.small_organs]

    def stage_one_probabilities(self, coarse_image: np.ndarray) -> np.ndarray:
        """(K, *coarse) softmax of stage one on a preprocessed coarse image."""
        logits = predict_logits(self.model, coarse_image, self.plan, overlap=self.overlap,
                                mirror_axes=self.mirror_axes, device=self.device, amp=self.amp)
        return torch.softmax(logits, 0).numpy()

    def stage_two_probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """(1 + n_small, *crop) softmax of stage two on its (1 + n_small, *crop) inputs."""
        logits = predict_logits(self.stage2_model, inputs, self.stage2_plan, overlap=self.overlap,
                                mirror_axes=self.mirror_axes, device=self.device, amp=self.amp)
        return torch.softmax(logits, 0).numpy()

    def predict(self, image, *, return_probabilities: bool = False):
        """Segments one ``fastseg.data.io.Image`` with both stages; returns the label-map Image in the input's
        geometry (and, with ``return_probabilities``, a :class:`ProbabilityBox` of the cascade's
        probabilities)."""
        from fastseg.data.preprocess import preprocess_case

        self._check_image(image)
        plan1, plan2 = self.plan, self.stage2_plan
        coarse = preprocess_case(image.array, image.spacing, None, target_spacing=plan1["target_spacing"],
                                 window=plan1["window"])
        fine = preprocess_case(image.array, image.spacing, None, target_spacing=plan2["target_spacing"],
                               window=plan2["window"])
        probs1 = self.stage_one_probabilities(coarse.image)
        box, found = cascade_crop(probs1, self.small_channels, fine.info.shape, fine.info.spacing, self.margin_mm)
        if not found:
            warnings.warn("CascadePredictor: stage one predicts no small organ; stage two runs on the whole "
                          "body-cropped image", stacklevel=2)
        probs2 = self.stage_two_probabilities(_stage_two_input(fine.image, probs1, self.small_channels, box))
        probs = _combine(_resample_probs(probs1, fine.info.shape), probs2, box, self.small_channels)
        return self._outputs(image, self._index_to_values(probs.argmax(0)), probs, fine.info, return_probabilities)


def load_predictor(checkpoint: Union[str, Path], **kwargs: Any) -> Predictor:
    """A :class:`CascadePredictor` for a cascade's ``model_final.pt``, else a :class:`Predictor`; ``kwargs`` as
    :class:`Predictor`'s."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    if "cascade" in state:
        return CascadePredictor(state, **kwargs)
    if state["plan"].get("cascade_guidance"):
        raise ValueError(f"load_predictor: checkpoint: expected a single-stage model or a cascade's model_final.pt, "
                         f"got stage two of a cascade '{checkpoint}' (its inputs need stage one's probabilities); "
                         f"use {Path(checkpoint).parent.parent / FINAL}")
    return Predictor(state, **kwargs)
