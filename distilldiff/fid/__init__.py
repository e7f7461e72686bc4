"""FID evaluation, offline, with the standard TF Inception-v3 network (DESIGN.md section 4)."""

from .api import (
    BUILTIN_REFERENCES,
    FIDResult,
    ReferenceStats,
    builtin_reference_images,
    compute_fid,
    extract_features,
    image_batches,
    load_reference,
)
from .classifier import MNISTClassifier, class_accuracy, classifier_fd, classifier_features, load_mnist_classifier
from .features import InceptionFeatureExtractor, build_fidelity_extractor, cache_dir, images_to_uint8, resolve_weights
from .metrics import feature_statistics, frechet_distance, kernel_inception_distance, precision_recall

__all__ = [
    "BUILTIN_REFERENCES", "FIDResult", "ReferenceStats", "builtin_reference_images", "compute_fid",
    "extract_features", "image_batches", "load_reference", "InceptionFeatureExtractor",
    "build_fidelity_extractor", "cache_dir", "images_to_uint8", "resolve_weights",
    "feature_statistics", "frechet_distance", "kernel_inception_distance", "precision_recall",
    "MNISTClassifier", "load_mnist_classifier", "class_accuracy", "classifier_features", "classifier_fd",
]
