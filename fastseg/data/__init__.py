"""Data: image files (NIfTI, NRRD), dataset descriptions, label maps from overlapping organ masks."""
from fastseg.data.dataset import (
    Case,
    DatasetSpec,
    check_geometry,
    label_map_to_masks,
    masks_to_label_map,
    normalize_organs,
    write_dataset_description,
)
from fastseg.data.io import (
    IMAGE_SUFFIXES,
    Image,
    ImageFormatError,
    atomic_output,
    case_name,
    image_suffix,
    read_image,
    write_image,
)

__all__ = [
    "Image",
    "ImageFormatError",
    "read_image",
    "write_image",
    "atomic_output",
    "image_suffix",
    "case_name",
    "IMAGE_SUFFIXES",
    "DatasetSpec",
    "Case",
    "masks_to_label_map",
    "label_map_to_masks",
    "check_geometry",
    "normalize_organs",
    "write_dataset_description",
]
