"""Sliding-window prediction with a trained reference model: reads images, writes label maps with the input's
spacing, origin and direction (and, on request, the probabilities for ``fastseg confidence``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from fastseg.data.io import case_name, image_suffix
from fastseg.training.checkpoint import load_checkpoint
from fastseg.training.trainer import _resolve_device, build_model, predict_logits


@dataclass(frozen=True)
class ProbabilityBox:
    """Class probabilities of a whole volume, stored inside the box where some organ is likely.

    Outside the box every organ's probability is below 1/255 and is taken as 0, the background's (channel 0
    of softmax models) as 1; a 22-class 512x512x160 volume would otherwise cost 3.7 GB in float32.

    Attributes:
        probs: (K, *box) probabilities.
        lower: the box's lower corner (voxel indices of the volume).
        shape: the volume's spatial shape.
        background: channel 0 is the background (softmax); False for sigmoid outputs (one channel per organ).
    """

    probs: np.ndarray
    lower: Tuple[int, ...]
    shape: Tuple[int, ...]
    background: bool = True

    @property
    def slices(self) -> Tuple[slice, ...]:
        return (slice(None),) + tuple(slice(a, a + n) for a, n in zip(self.lower, self.probs.shape[1:]))

    def full(self) -> np.ndarray:
        """The (K, *shape) float32 volume."""
        out = np.zeros((self.probs.shape[0],) + tuple(self.shape), np.float32)
        out[0] = float(self.background)
        out[self.slices] = self.probs
        return out


class Predictor:
    """Loads a checkpoint of :class:`fastseg.training.Trainer` and segments images.

    Args:
        checkpoint: a ``checkpoint.pt`` / ``model_final.pt`` (read with ``weights_only=True``), or its
            already loaded contents.
        device: 'auto' | 'cpu' | 'cuda'.
        overlap: sliding-window overlap in [0, 1); windows are Gaussian-weighted (nnU-Net).
        mirror_axes: spatial axes mirrored for test-time augmentation (each of the 2^k flips is predicted
            and the logits averaged); () for none.
        amp: bf16 autocast on CUDA.
        keep_largest_component: organs (names, or True for all) of which only the largest connected component
            is kept (fastseg.postprocess.keep_largest_component); removes stray islands that inflate HD95.
    """

    def __init__(self, checkpoint: Union[str, Path, Dict], *, device: str = "auto", overlap: float = 0.5,
                 mirror_axes: Sequence[int] = (), amp: bool = True,
                 keep_largest_component: Union[bool, Sequence[str]] = False):
        self.device = _resolve_device(device)
        state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, map_location="cpu")
        self.plan = state["plan"]
        self.model = build_model(self.plan)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"Predictor: overlap: expected a number in [0, 1), got {overlap!r}")
        nd = len(self.plan["patch_size"])
        for a in mirror_axes:
            if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < nd:
                raise ValueError(f"Predictor: mirror_axes: expected spatial axes in [0, {nd}), got {tuple(mirror_axes)}")
        self.overlap = float(overlap)
        self.mirror_axes = tuple(mirror_axes)
        self.amp = amp
        self.largest_component_values = self._component_values(keep_largest_component)

    @property
    def organs(self) -> List[str]:
        return list(self.plan["organs"])

    def _component_values(self, organs: Union[bool, Sequence[str]]) -> List[int]:
        if isinstance(organs, bool):
            organs = self.organs if organs else []
        elif isinstance(organs, str) or not all(isinstance(o, str) for o in organs):
            raise ValueError("Predictor: keep_largest_component: expected True / False or a list of organ names, "
                             f"got {organs!r}")
        unknown = [o for o in organs if o not in self.plan["label_values"]]
        if unknown:
            raise ValueError(f"Predictor: keep_largest_component: expected organs of the model ({self.organs}), "
                             f"got unknown {unknown}")
        return [int(self.plan["label_values"][o]) for o in organs]

    def predict(self, image, *, return_probabilities: bool = False):
        """Segments one ``fastseg.data.io.Image``; returns the label-map Image in the input's geometry (and,
        with ``return_probabilities``, a :class:`ProbabilityBox` of the class probabilities there too)."""
        from fastseg.data.preprocess import preprocess_case

        self._check_image(image)
        pre = preprocess_case(image.array, image.spacing, None, target_spacing=self.plan["target_spacing"],
                              window=self.plan["window"])
        logits = predict_logits(self.model, pre.image, self.plan, overlap=self.overlap,
                                mirror_axes=self.mirror_axes, device=self.device, amp=self.amp)
        if self.plan["activation"] == "sigmoid":
            probs = torch.sigmoid(logits).numpy()
            label = self._masks_to_labels(probs > 0.5)
        else:
            probs = torch.softmax(logits, 0).numpy()
            label = self._index_to_values(probs.argmax(0))
        return self._outputs(image, label, probs, pre.info, return_probabilities)

    def _check_image(self, image) -> None:
        nd = len(self.plan["patch_size"])
        if image.array.ndim != nd:
            raise ValueError(f"{type(self).__name__}: image: expected a {nd}D image (the model's), got shape "
                             f"{image.array.shape}")

    def _outputs(self, image, label: np.ndarray, probs: np.ndarray, info, return_probabilities: bool):
        """Post-processing, then the label map (and the probabilities) back in the input's geometry."""
        from fastseg.data.preprocess import restore_label, restore_probabilities_box

        if self.largest_component_values:
            from fastseg.postprocess import keep_largest_component

            label = keep_largest_component(label, self.largest_component_values)
        restored = restore_label(label, info)
        out = image.with_array(restored.astype(np.uint8 if restored.max(initial=0) < 256 else np.int16))
        if not return_probabilities:
            return out
        softmax = self.plan["activation"] == "softmax"
        part, lower = restore_probabilities_box(probs, info, background=softmax)
        return out, ProbabilityBox(part, lower, tuple(image.array.shape), background=softmax)

    def _index_to_values(self, index: np.ndarray) -> np.ndarray:
        """Channel index (0 background, k organ k) -> the dataset's label values."""
        lut = np.zeros(len(self.organs) + 1, np.int32)
        for k, organ in enumerate(self.organs):
            lut[k + 1] = self.plan["label_values"][organ]
        return lut[index]

    def _masks_to_labels(self, masks: np.ndarray) -> np.ndarray:
        from fastseg.data.dataset import masks_to_label_map

        named = {organ: masks[k] for k, organ in enumerate(self.organs)}
        return masks_to_label_map(named, self.plan["label_values"], self.plan["priority"] or None)

    def predict_files(self, inputs: Sequence[Union[str, Path]], output_dir: Union[str, Path], *,
                      save_probabilities: bool = False, progress: bool = True) -> List[Path]:
        """Segments every image file of ``inputs``; writes ``<case>.nii.gz`` (or the input's format) into
        ``output_dir``, atomically, and ``<case>_probs.npz`` (float16, compressed) on request."""
        from fastseg.data.io import read_image, write_image

        paths = [Path(p) for p in inputs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"predict: inputs: expected existing image files, missing {missing}")
        out_dir = Path(output_dir)
        written = []
        iterator = paths
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(paths, desc="predict", unit="case")
        for path in iterator:
            image = read_image(path)
            suffix = image_suffix(path) or ".nii.gz"
            name = case_name(path) or path.stem
            if save_probabilities:
                label, probs = self.predict(image, return_probabilities=True)
                save_probability_file(out_dir / f"{name}_probs.npz", probs, self.organs, label.spacing)
            else:
                label = self.predict(image)
            written.append(write_image(out_dir / f"{name}{suffix}", label))
        return written


def save_probability_file(path: Path, probs: ProbabilityBox, organs: Sequence[str], spacing) -> Path:
    """Stores a :class:`ProbabilityBox` as compressed float16 (atomically)."""
    from fastseg._atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probs=probs.probs.astype(np.float16), lower=np.array(probs.lower, np.int64),
                                shape=np.array((probs.probs.shape[0],) + tuple(probs.shape), np.int64),
                                background=np.array(probs.background), organs=np.array(list(organs)),
                                spacing=np.array(spacing, dtype=np.float64))
    return path


def load_probability_file(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Reads :func:`save_probability_file`'s output back to a full (K, *S) float32 array."""
    with np.load(path, allow_pickle=False) as z:
        box = ProbabilityBox(z["probs"].astype(np.float32), tuple(int(v) for v in z["lower"]),
                             tuple(int(s) for s in z["shape"][1:]), bool(z["background"]))
        return {"probs": box.full(), "organs": [str(o) for o in z["organs"]], "spacing": z["spacing"]}
