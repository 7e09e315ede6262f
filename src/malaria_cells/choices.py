"""Names users choose between, kept free of TensorFlow so that ``--help`` is instant."""

MODEL_NAMES = ("cellnet-slim", "cellnet-lite", "cellnet", "tutorial", "mobilenetv3small", "mobilenetv3large", "efficientnetv2b0")
"""Architectures ``build_model`` knows; the first is the default."""
COLORS = ("rgb", "gray")
AUGMENTATIONS = ("none", "flips", "flips+color", "flips+stain", "flips+color+focus")
SPLITS = ("patient", "random")
SCHEDULES = ("cosine", "constant")
PRESET_NAMES = ("tutorial",)
"""Named recipes of ``training.PRESETS``."""
