"""Names, choices and limits, each written once (and free of TensorFlow, so ``--help`` is instant).

Every module that validates a user's choice, and the command line that offers it, reads it
from here.
"""

CLASS_NAMES = ("Uninfected", "Parasitized")
"""Class names in label order: label 0 is Uninfected, label 1 is Parasitized."""

MODEL_NAMES = ("cellnet-slim", "cellnet-lite", "cellnet", "tutorial", "mobilenetv3small", "mobilenetv3large",
               "efficientnetv2b0")
"""Architectures ``models.build_model`` knows; the first is the default."""
COLORS = ("rgb", "gray")
AUGMENTATIONS = ("none", "flips", "flips+color", "flips+stain", "flips+color+focus", "flips+color+blur", "flips+color+restain", "shifts")
SPLITS = ("patient", "random")
SCHEDULES = ("cosine", "constant")
PRESET_NAMES = ("tutorial",)
"""Named recipes of ``training.PRESETS``."""
EXPORT_FORMATS = ("tflite", "onnx", "saved_model")
QUANTIZATIONS = ("none", "float16", "int8")
MODEL_SUFFIXES = (".keras", ".tflite", ".onnx")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
"""File names a folder listing takes as images (the decoder itself reads the bytes, not the name)."""

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
"""Bounds of a model's square input side, in pixels."""

MAX_IMAGE_PIXELS = 40_000_000
"""Larger images are refused from their header, before decoding, as probable decompression
bombs: a cell crop is ~0.02 MP and a 16 MP phone photograph of a field fits with room to spare.
Only the first frame of a multi-frame file is ever decoded, so this bounds every image."""


MAX_PIXELS_IN_FLIGHT = 2 * MAX_IMAGE_PIXELS
"""Decoded pixels the whole process holds at once (about 240 MB as RGB): decoding waits for
room, so memory stays bounded however many images or requests arrive together."""


def check_image_size(size: int) -> int:
    """Validate a model input side (the one rule for training and model building)."""
    from .errors import MalariaCellsError

    if not MIN_IMAGE_SIZE <= int(size) <= MAX_IMAGE_SIZE:
        raise MalariaCellsError(f"image size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {size}")
    return int(size)


def check_choice(value: str, choices, what: str) -> str:
    """Validate a name against its choices, with a message that lists them."""
    from .errors import MalariaCellsError

    if value not in choices:
        raise MalariaCellsError(f"unknown {what} {value!r}: choose from {', '.join(choices)}")
    return value
