"""Evaluation metrics: FID (and KID, precision/recall) with the standard TF Inception-v3 network, offline, and the shipped MNIST classifier's class accuracy and Frechet distance."""

from .fid import (
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
from .inception import InceptionFeatureExtractor, build_fidelity_extractor, cache_dir, images_to_uint8, resolve_weights
from .statistics import feature_statistics, frechet_distance, kernel_inception_distance, precision_recall

__all__ = [
    "BUILTIN_REFERENCES", "FIDResult", "ReferenceStats", "builtin_reference_images", "compute_fid",
    "extract_features", "image_batches", "load_reference", "InceptionFeatureExtractor",
    "build_fidelity_extractor", "cache_dir", "images_to_uint8", "resolve_weights",
    "feature_statistics", "frechet_distance", "kernel_inception_distance", "precision_recall",
    "MNISTClassifier", "load_mnist_classifier", "class_accuracy", "classifier_features", "classifier_fd",
]
