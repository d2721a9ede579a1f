"""Models: the packaged pretrained models (:mod:`.packaged`) and tiny random ones for tests
(:mod:`.tiny`)."""

from .packaged import (
    CACHE_ENV,
    CAUSAL_LMS,
    DEFAULT_IMAGE_SIZE,
    IMAGE_MEAN,
    IMAGE_STD,
    cache_root,
    image_transform,
    load_causal_lm,
    load_image_classifier,
    load_text_classifier,
    packaged_text_model_path,
)

__all__ = [
    "CACHE_ENV",
    "CAUSAL_LMS",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "cache_root",
    "image_transform",
    "load_causal_lm",
    "load_image_classifier",
    "load_text_classifier",
    "packaged_text_model_path",
]
