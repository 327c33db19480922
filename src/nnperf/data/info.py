"""What a model and its batches need to know of the data they were trained on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .augment import Augment


@dataclass(frozen=True)
class DataInfo:
    """Class names, image shape, normalisation, training augmentation and the evaluation split.
    Saved with every checkpoint and in env.json as a plain dict (`to_dict`: loadable with
    weights_only=True); `from_dict` reads it back, including from checkpoints of older versions
    that lack the optional counts."""

    classes: list[str]
    shape: tuple[int, int, int]  # channels, height, width
    mean: list[float]
    std: list[float]
    augment: Augment
    eval_split: str  # "val" when --val-split held images out, else "test"
    dataset: str | None = None
    train_images: int | None = None
    eval_images: int | None = None
    input_size: int | None = None  # batches are resized on the device to this side (None: as stored)
    interpolation: str = "bilinear"  # of that resize (F.interpolate's mode)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape the model sees: the stored images', or the --image-size they are resized to."""
        return (self.channels, self.input_size, self.input_size) if self.input_size else tuple(self.shape)

    @property
    def image_size(self) -> int:
        return min(self.input_shape[1:])

    @property
    def resize(self) -> tuple[int, str] | None:
        """(side, interpolation) of the on-device resize, or None."""
        return (self.input_size, self.interpolation) if self.input_size else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        out = {"dataset": self.dataset, "classes": list(self.classes), "shape": list(self.shape),
               "mean": list(self.mean), "std": list(self.std), "augment": dataclasses.asdict(self.augment),
               "eval_split": self.eval_split, "train_images": self.train_images, "eval_images": self.eval_images,
               "input_size": self.input_size,
               "interpolation": self.interpolation if self.input_size else None}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        """From a checked plain form (train.checkpoint.data_problem says what is wrong with one)."""
        return cls(list(d["classes"]), tuple(d["shape"]), list(d["mean"]), list(d["std"]), Augment(**d["augment"]),
                   d["eval_split"], d.get("dataset"), d.get("train_images"), d.get("eval_images"),
                   d.get("input_size"), d.get("interpolation") or "bilinear")
