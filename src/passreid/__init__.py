"""passreid: PASS part-aware self-supervised pre-training and person re-identification."""

__version__ = "0.1.0"
