"""The reference trainer: an nnU-Net-style 3D U-Net trained with fastseg's fused DiceCE (class adaptive Dice by
default) and deep supervision.

Everything a run needs to be resumed exactly lives in its checkpoint: model, optimiser, learning-rate schedule,
torch RNG states, the iteration and the log history. The data stream needs no saved state: sample ``i`` of the
run draws all its randomness from ``np.random.default_rng([seed, i])`` (fastseg.data.sampling), so resuming at
iteration t replays the samples an uninterrupted run would have drawn, whatever the number of workers.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fastseg import _atomic
from fastseg.data.augment import Augmenter, lateral_axis, lateral_pairs, swapped_channels
from fastseg.training.checkpoint import load_checkpoint, save_checkpoint
from fastseg.training.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
FINAL = "model_final.pt"


@dataclass
class PreparedCase:
    name: str
    image: np.ndarray  # (1, *S) float32, normalised
    label: np.ndarray  # (*S) label map, or (K, *S) uint8 organ stack for sigmoid training


class TrainingInterrupted(RuntimeError):
    """Raised by :meth:`Trainer.fit` after SIGINT / SIGTERM, once the checkpoint is written."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"training stopped by {signal.Signals(signum).name}; resume from {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------------------------------------
def _world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("TrainConfig: device: expected 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------
class Trainer:
    """Trains the reference U-Net on a dataset description; see :class:`TrainConfig` for every setting.

    Example:
        >>> trainer = Trainer(TrainConfig(dataset="phantom/dataset.json", output_dir="runs/a", iterations=200))
        >>> result = trainer.fit()          # resumes from runs/a/checkpoint.pt when it exists
        >>> result["val_dice"]              # per-organ validation Dice of the last validation
    """

    def __init__(self, config: TrainConfig, *, resume: bool = True, progress: bool = True):
        self.config = config
        self.out = Path(config.output_dir)
        self.resume = resume
        self.progress = progress
        self.device = _resolve_device(config.device)
        _init_distributed(self.device)
        self.rank, self.world = _world()
        self.history: List[Dict[str, Any]] = []
        self.iteration = 0
        self._stop_signal: Optional[int] = None

    # ---- data ------------------------------------------------------------------------------------------
    def prepare_data(self, loaded: Optional[tuple] = None) -> None:
        """Reads and preprocesses the training and validation cases and fixes the plan (spacing, patch, net).

        ``loaded``: the ``(spec, train, val)`` of :func:`load_dataset`, when the caller has read the data already.
        """
        cfg = self.config
        if loaded is None and cfg.cache_dir:
            return self._prepare_cached()
        spec, train_raw, val_raw = loaded if loaded is not None else load_dataset(cfg)
        spacing = cfg.target_spacing or median_spacing(train_raw)
        self.spec = spec
        values = list(spec.label_values.values())
        self.use_cases(prepare_cases(train_raw, spacing, cfg.window, values),
                       prepare_cases(val_raw, spacing, cfg.window, values), spacing,
                       organs=list(spec.organs), label_values=spec.label_values,
                       priority=getattr(spec, "priority", None) or [], lateral=lateral_axis_of(train_raw))

    def _prepare_cached(self) -> None:
        """prepare_data through the disk cache of ``cache_dir`` (fastseg.training.cache): a case is read only
        if its spacing / direction or its preprocessed arrays for these settings are not cached yet."""
        from fastseg.training.cache import CaseCache

        cfg = self.config
        spec, train_names, val_names = open_dataset(cfg)
        sigmoid = cfg.activation == "sigmoid"
        cache = CaseCache(cfg.cache_dir, spec, multilabel=sigmoid)
        raw: Dict[str, Any] = {}

        def load(name: str):
            if name not in raw:
                raw[name] = load_case(spec, name, multilabel=sigmoid, where=cfg.dataset)
            return raw[name]

        def geometry(name: str) -> Dict[str, Any]:
            image = load(name).image
            return {"spacing": [float(v) for v in image.spacing], "direction": np.asarray(image.direction).tolist()}

        meta = {name: cache.meta(name, lambda name=name: geometry(name)) for name in train_names + val_names}
        spacing = cfg.target_spacing or median_of_spacings([meta[n]["spacing"] for n in train_names])
        values = list(spec.label_values.values())
        key = cache.prep_key(spacing, cfg.window, values)

        def prepared(names: Sequence[str]) -> List[PreparedCase]:
            out = []
            for name in names:
                image, label = cache.prepared(
                    name, key, lambda name=name: prepare_case(load(name), spacing, cfg.window, values))
                raw.pop(name, None)
                out.append(PreparedCase(name, image, label))
            return out

        self.spec = spec
        self.use_cases(prepared(train_names), prepared(val_names), spacing, organs=list(spec.organs),
                       label_values=spec.label_values, priority=getattr(spec, "priority", None) or [],
                       lateral=common_lateral_axis([meta[n]["direction"] for n in train_names]))

    def use_cases(self, train_cases: Sequence[PreparedCase], val_cases: Sequence[PreparedCase],
                  spacing: Sequence[float], *, organs: Sequence[str], label_values: Dict[str, int],
                  priority: Sequence[str] = (), in_channels: int = 1, lateral: Optional[int] = None) -> None:
        """Trains on already prepared cases (label maps with values 0..len(organs), as the loss sees them) and
        fixes the plan; the cascade's stage two uses it for its crops with ``in_channels`` input channels.
        ``lateral``: the array axis of the patient's left-right direction (:func:`lateral_axis_of`)."""
        self.train_cases = list(train_cases)
        self.val_cases = list(val_cases)
        self.plan = self._make_plan(list(organs), label_values, list(priority), [float(s) for s in spacing],
                                    in_channels, lateral)

    def _lateral(self, organs: List[str], axis: Optional[int]) -> Optional[Dict[str, Any]]:
        """{"axis", "pairs" (class indices)} of the left / right organ pairs, or None (nothing to swap)."""
        wanted = self.config.lateral_pairs
        if wanted == "none" or axis is None:
            return None
        if wanted == "auto":
            pairs = lateral_pairs(organs)
        else:
            unknown = sorted({o for pair in wanted for o in pair} - set(organs))
            if unknown:
                raise ValueError(f"TrainConfig: lateral_pairs: expected organs of the dataset {organs}, got "
                                 f"unknown {unknown}")
            pairs = [(organs.index(a), organs.index(b)) for a, b in wanted]
        if not pairs:
            return None
        return {"axis": int(axis), "pairs": [[i + 1, j + 1] for i, j in pairs]}

    def _make_plan(self, organs: List[str], label_values: Dict[str, int], priority: List[str],
                   spacing: List[float], in_channels: int, lateral: Optional[int]) -> Dict[str, Any]:
        cfg = self.config
        patch = cfg.patch_size
        if patch == "auto":
            patch = self._auto_patch_size(spacing, len(organs) + 1)
        if len(patch) != len(spacing):
            raise ValueError(f"TrainConfig: patch_size: expected {len(spacing)} values (the data is "
                             f"{len(spacing)}D), got {patch}")
        from fastseg.models import trained_patch_size

        # the planned network downsamples each axis by a fixed factor: round the patch up to a multiple of it
        patch = trained_patch_size(patch, spacing, base_features=cfg.base_features, max_features=cfg.max_features)
        return {
            "organs": organs,
            "label_values": {k: int(v) for k, v in label_values.items()},
            "priority": priority,
            "target_spacing": spacing,
            "window": list(cfg.window),
            "patch_size": [int(p) for p in patch],
            "in_channels": int(in_channels),
            "num_classes": len(organs) + (0 if cfg.activation == "sigmoid" else 1),
            "activation": cfg.activation,
            "base_features": cfg.base_features,
            "max_features": cfg.max_features,
            "deep_supervision": cfg.deep_supervision,
            "lateral": self._lateral(organs, lateral),
        }

    def _auto_patch_size(self, spacing: List[float], num_classes: int) -> List[int]:
        from fastseg.imbalance import recommend_patch_size

        labels = [c.label if c.label.ndim == len(spacing) else _stack_to_labels(c.label) for c in self.train_cases]
        return recommend_patch_size(labels, spacing=spacing, num_classes=num_classes,
                                    oversample_foreground=self.config.oversample_foreground,
                                    memory_budget_gb=self.config.memory_budget_gb,
                                    batch_size=self.config.batch_size, base_features=self.config.base_features,
                                    max_features=self.config.max_features,
                                    min_coverage=self.config.min_coverage)

    def _augmenter(self) -> Augmenter:
        lateral = self.plan["lateral"]
        swap = {lateral["axis"]: lateral["pairs"]} if lateral else None
        # the cascade's stage two: channels after the image are stage one's probabilities, not intensities
        guidance = len(self.plan.get("cascade_guidance", ()))
        return Augmenter(spacing=self.plan["target_spacing"], swap_on_flip=swap,
                         intensity_channels=self.plan["in_channels"] - guidance if guidance else None)

    def _loader(self, start_iteration: int):
        from fastseg.data.sampling import PatchDataset, make_loader

        cfg = self.config
        dataset = PatchDataset(
            [(c.image, c.label) for c in self.train_cases], self.plan["patch_size"],
            oversample_foreground=cfg.oversample_foreground, seed=cfg.seed,
            augment=self._augmenter() if cfg.augment else None,
            length=cfg.iterations * cfg.batch_size * self.world,
        )
        return make_loader(dataset, cfg.batch_size, start_iteration=start_iteration, num_workers=cfg.num_workers,
                           rank=self.rank, num_replicas=self.world, pin_memory=self.device.type == "cuda")

    # ---- model, loss, optimiser ------------------------------------------------------------------------
    def build(self) -> None:
        from fastseg.losses import DeepSupervisionLoss, DiceCELoss

        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.plan).to(self.device)
        self.net = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        base = DiceCELoss(activation=cfg.activation, include_background=cfg.include_background,
                          batch_dice=cfg.batch_dice, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_ce,
                          absent_classes=cfg.absent_classes, absent_penalty=cfg.absent_penalty)
        self.loss_fn = DeepSupervisionLoss(base)
        params = self.model.parameters()
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.99, nesterov=True,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=cfg.iterations,
                                                               power=cfg.poly_exponent)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": self.config.to_dict(),
            "plan": self.plan,
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "history": self.history,
        }

    def save(self, name: str = CHECKPOINT) -> Path:
        path = self.out / name
        if self.rank == 0:
            save_checkpoint(self.state(), path)
        return path

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state["plan"] != self.plan:
            raise ValueError(f"Trainer: checkpoint {path} was trained with another plan "
                             f"({state['plan']}) than this config gives ({self.plan}); "
                             "use another output_dir or resume=False")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])

    # ---- the loop --------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Trains to ``config.iterations``; returns the last validation and the paths written."""
        cfg = self.config
        if cfg.deterministic:
            _set_deterministic()
        if not hasattr(self, "plan"):
            self.prepare_data()
        self.build()
        ckpt = self.out / CHECKPOINT
        if self.resume and ckpt.is_file():
            self.load(ckpt)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic.write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        with self._signals():
            self._run()
        return self._finish()

    def _run(self) -> None:
        cfg = self.config
        if self.iteration >= cfg.iterations:
            return
        loader = iter(self._loader(self.iteration))
        bar = self._progress_bar()
        self.net.train()
        voxels = cfg.batch_size * int(np.prod(self.plan["patch_size"])) * self.world
        while self.iteration < cfg.iterations:
            t0 = time.perf_counter()
            image, label = next(loader)
            loss = self._step(image, label)
            self.iteration += 1
            dt = time.perf_counter() - t0
            self.history.append({"iteration": self.iteration, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                 "seconds": dt, "voxels_per_s": voxels / dt})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", vox_s=f"{voxels / dt:.3g}", refresh=False)
            if self._stop_requested():
                self.save()
                self._write_logs()
                raise TrainingInterrupted(self._stop_signal, self.out / CHECKPOINT)
            done = self.iteration == cfg.iterations
            if self.val_cases and (done or (cfg.val_every and self.iteration % cfg.val_every == 0)):
                self.validate()
                self.net.train()
            if done or (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0):
                self.save()
                self._write_logs()
        if bar is not None:
            bar.close()

    def _step(self, image: torch.Tensor, label: torch.Tensor) -> float:
        cfg = self.config
        image = image.to(self.device, non_blocking=True)
        label = label.to(self.device, non_blocking=True)
        amp = cfg.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = self.net(image)
        loss = self.loss_fn(outputs, label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def _progress_bar(self):
        if not self.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.iterations, initial=self.iteration, desc="train", unit="it",
                    mininterval=1.0 if sys.stderr.isatty() else 15.0, dynamic_ncols=True)

    # ---- validation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Sliding-window prediction of every validation case (in the preprocessed space); per-organ Dice."""
        if self.rank != 0:
            self._barrier()
            return {}
        from fastseg.metrics import dice_score

        organs = self.plan["organs"]
        scores = []
        self.model.eval()
        for case in self.val_cases:
            pred = self.predict_logits(case.image)
            target = torch.from_numpy(np.ascontiguousarray(case.label))
            if self.plan["activation"] == "sigmoid":
                d = dice_score((pred > 0)[None], target[None].bool(), include_background=True)
            else:
                d = dice_score(pred.argmax(0)[None], target[None].long(), num_classes=len(organs) + 1)
            scores.append(d[0].double().numpy())
        per_organ = _quiet_nanmean(np.stack(scores), 0)
        result = {name: float(v) for name, v in zip(organs, per_organ)}
        self.history.append({"iteration": self.iteration, "val_dice": result,
                             "val_mean_dice": float(_quiet_nanmean(per_organ))})
        self._barrier()
        return result

    def predict_logits(self, image: np.ndarray) -> torch.Tensor:
        """(K, *S) float32 logits of one preprocessed (1, *S) image, on the CPU."""
        return predict_logits(self.model, image, self.plan, overlap=self.config.sw_overlap, device=self.device,
                              amp=self.config.amp)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---- signals and logs ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT / SIGTERM request a stop after the current iteration (checkpoint written, then
        TrainingInterrupted). Only the main thread can install handlers; elsewhere signals stay as they are."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        stop = self._stop_signal is not None
        if self.world > 1:  # every rank must stop at the same iteration, or the collectives hang
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        return stop

    def _write_logs(self) -> None:
        if self.rank != 0:
            return
        train_rows = [h for h in self.history if "loss" in h]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["iteration", "loss", "lr", "seconds", "voxels_per_s"])
        writer.writeheader()
        writer.writerows(train_rows)
        _atomic.write_text(self.out / "log.csv", buf.getvalue())
        _atomic.write_text(self.out / "log.json", json.dumps(
            {"config": self.config.to_dict(), "plan": self.plan, "history": self.history}, indent=1))
        plot_curves(self.history, self.out / "curves.png")

    def _finish(self) -> Dict[str, Any]:
        self._write_logs()
        final = self.save(FINAL)
        vals = [h for h in self.history if "val_dice" in h]
        return {"checkpoint": final, "iteration": self.iteration,
                "val_dice": vals[-1]["val_dice"] if vals else None,
                "history": self.history}


# --------------------------------------------------------------------------------------------------------
def open_dataset(config: TrainConfig) -> tuple:
    """``(spec, train_names, val_names)``: the dataset description and its split, reading no case."""
    from fastseg.data.dataset import DatasetSpec

    if not config.dataset:
        raise ValueError("TrainConfig: dataset: expected a dataset description file, got ''")
    spec = DatasetSpec.load(config.dataset)
    return (spec, *_split_cases(config, spec))


def load_case(spec, name: str, *, multilabel: bool, where: str):
    """One raw case (``fastseg.data.dataset.Case``), which training needs with an image."""
    case = spec.load_case(name, multilabel=multilabel)
    if case.image is None:
        raise ValueError(f"Trainer: dataset {where} has no images (no 'image' pattern); training needs an image "
                         "per case")
    return case


def load_dataset(config: TrainConfig) -> tuple:
    """``(spec, train, val)``: the dataset description and its raw training and validation cases
    (``fastseg.data.dataset.Case``, every one with an image)."""
    spec, train_names, val_names = open_dataset(config)
    sigmoid = config.activation == "sigmoid"
    raw = [load_case(spec, name, multilabel=sigmoid, where=config.dataset) for name in train_names + val_names]
    return spec, raw[: len(train_names)], raw[len(train_names):]


def _split_cases(config: TrainConfig, spec) -> tuple:
    splits = getattr(spec, "splits", None) or {}
    train = list(spec.cases(config.train_split) if config.train_split in splits else spec.cases())
    if config.val_split and config.val_split in splits:
        return train, list(spec.cases(config.val_split))
    if config.val_cases >= len(train):
        raise ValueError(f"TrainConfig: val_cases: expected fewer than the {len(train)} training cases, "
                         f"got {config.val_cases}")
    k = len(train) - config.val_cases
    return train[:k], train[k:]


def lateral_axis_of(cases: Sequence[Any]) -> Optional[int]:
    """The array axis along the patient's left-right direction, from the raw cases' image directions; None
    when the cases disagree (then no left / right label swapping is safe)."""
    return common_lateral_axis([c.image.direction for c in cases])


def common_lateral_axis(directions: Sequence[Any]) -> Optional[int]:
    """lateral_axis_of from the images' direction matrices."""
    axes = {lateral_axis(np.asarray(d)) for d in directions}
    return axes.pop() if len(axes) == 1 else None


def median_spacing(cases: Sequence[Any]) -> List[float]:
    """The per-axis median image spacing of raw cases (the default target spacing)."""
    return median_of_spacings([c.image.spacing for c in cases])


def median_of_spacings(spacings: Sequence[Sequence[float]]) -> List[float]:
    return [float(s) for s in np.median(spacings, 0)]


def prepare_cases(cases: Sequence[Any], spacing: Sequence[float], window: Sequence[float],
                  label_values: Optional[Sequence[int]] = None) -> List[PreparedCase]:
    """Body crop, CT window and resampling of raw cases (``fastseg.data.preprocess.preprocess_case``).

    ``label_values``: the dataset's value of each organ, in organ order; label maps are renumbered so organ k
    is k + 1 (the loss's class index) when the values are not already 1..K (a label map with gaps, say).
    """
    return [PreparedCase(case.name, *prepare_case(case, spacing, window, label_values)) for case in cases]


def prepare_case(case: Any, spacing: Sequence[float], window: Sequence[float],
                 label_values: Optional[Sequence[int]] = None) -> tuple:
    """``(image, label)`` of one raw case, as :func:`prepare_cases`."""
    from fastseg.data.preprocess import preprocess_case

    label = case.label.array
    if label_values is not None and label.ndim == case.image.array.ndim:
        label = _to_class_indices(label, label_values)
    p = preprocess_case(case.image.array, case.image.spacing, label, target_spacing=spacing, window=window)
    return p.image, p.label


def _quiet_nanmean(a: np.ndarray, axis=None):
    """np.nanmean, nan without a warning for an organ absent from every validation case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis)


def _to_class_indices(label: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    values = [int(v) for v in label_values]
    if values == list(range(1, len(values) + 1)):
        return label
    lut = np.zeros(max(values) + 1, np.uint8 if len(values) < 256 else np.int16)
    lut[values] = np.arange(1, len(values) + 1)
    return lut[label]


def build_model(plan: Dict[str, Any]) -> nn.Module:
    """The reference U-Net of a plan (a checkpoint's ``plan``)."""
    from fastseg.models import UNet

    return UNet.from_patch_size(plan["in_channels"], plan["num_classes"], plan["patch_size"],
                                plan["target_spacing"], base_features=plan["base_features"],
                                max_features=plan["max_features"], deep_supervision=plan["deep_supervision"])


def predict_logits(model: nn.Module, image: np.ndarray, plan: Dict[str, Any], *, overlap: float = 0.5,
                   mirror_axes: Sequence[int] = (), device: Optional[torch.device] = None,
                   amp: bool = True, progress: bool = False) -> torch.Tensor:
    """Sliding-window logits (K, *S) on the CPU of one preprocessed (C, *S) image, Gaussian-weighted."""
    from fastseg.inference import sliding_window_inference

    device = device or next(model.parameters()).device
    use_amp = amp and device.type == "cuda"

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            return model(x).float()

    def infer(volume: np.ndarray, axes: tuple) -> torch.Tensor:
        inputs = torch.from_numpy(np.ascontiguousarray(volume))[None]
        with torch.no_grad():
            return sliding_window_inference(inputs, plan["patch_size"], 2, predictor, overlap=overlap,
                                            mode="gaussian", mirror_axes=axes, sw_device=device,
                                            device=torch.device("cpu"), progress=progress)[0]

    model.eval()
    lateral = plan.get("lateral")
    if not lateral or lateral["axis"] not in mirror_axes:
        return infer(image, tuple(mirror_axes))
    # A left-right mirrored patient shows the left organs where the right ones are: the logits of the mirrored
    # image, flipped back, hold each organ of a pair in its partner's channel.
    axis = lateral["axis"]
    others = tuple(a for a in mirror_axes if a != axis)
    order = swapped_channels(lateral["pairs"], plan["num_classes"], background=plan["activation"] != "sigmoid")
    mirrored = infer(np.flip(image, axis + 1), others).flip(axis + 1)[torch.from_numpy(order)]
    return (infer(image, others) + mirrored) / 2


def _stack_to_labels(stack: np.ndarray) -> np.ndarray:
    """(K, *S) organ stack -> label map (first organ wins), for statistics that need one label per voxel."""
    label = np.zeros(stack.shape[1:], np.int16)
    for k in range(stack.shape[0] - 1, -1, -1):
        label[stack[k] > 0] = k + 1
    return label


def _set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def plot_curves(history: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Training loss (raw and smoothed) and per-organ validation Dice against the iteration, as one PNG."""
    train = [h for h in history if "loss" in h]
    if not train:
        return None
    # without pyplot: no global backend switch in the caller's (notebook) process
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vals = [h for h in history if "val_dice" in h]
    fig = Figure(figsize=(13 if vals else 6.5, 4.5), layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if vals else 1, squeeze=False)
    it = np.array([h["iteration"] for h in train])
    loss = np.array([h["loss"] for h in train])
    ax = axes[0, 0]
    ax.plot(it, loss, lw=0.5, alpha=0.4, label="loss")
    k = max(1, len(loss) // 50)
    if len(loss) > k:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set(xlabel="iteration", ylabel="DiceCE loss", title="training loss")
    ax.legend()
    if vals:
        ax = axes[0, 1]
        organs = list(vals[0]["val_dice"])
        vit = [h["iteration"] for h in vals]
        cmap = colormaps["tab20"].resampled(max(len(organs), 1))
        for j, organ in enumerate(organs):
            ax.plot(vit, [h["val_dice"][organ] for h in vals], marker="o", ms=3, color=cmap(j), label=organ)
        ax.set(xlabel="iteration", ylabel="Dice", ylim=(0, 1), title="validation Dice per organ")
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    return _atomic.save_figure(fig, path, dpi=110)
