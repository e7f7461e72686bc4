"""Metrics on feature sets, all from float64 features.

Feature statistics and the Frechet distance are ours (EDM's eigenvalue method); KID and improved
precision/recall are thin wrappers over torch-fidelity's feature-level functions.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, float64) of ``[N, D]`` features."""
    f = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features for statistics, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` for two Gaussians (Dowson & Landau 1982).

    ``Tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S1 S2`` (real and
    non-negative in exact arithmetic for covariance matrices; the real part of the complex square
    root absorbs rounding), so no matrix square root is needed.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(eig.astype(np.complex128)).real.sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _feature_pair(f1, f2, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[N, D]`` feature sets as float64 CPU tensors, with one-line errors for bad shapes."""
    t1 = torch.as_tensor(np.asarray(f1, dtype=np.float64))
    t2 = torch.as_tensor(np.asarray(f2, dtype=np.float64))
    if t1.ndim != 2 or t2.ndim != 2 or t1.shape[1] != t2.shape[1]:
        raise ValueError(f"{what} needs two [N, D] feature sets of the same D, got shapes {tuple(t1.shape)} and {tuple(t2.shape)}")
    return t1, t2


def kernel_inception_distance(
    f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3``.

    Computed by torch-fidelity's ``kid_features_to_metric`` on float64 copies of the features: the
    mean and (population) std over ``num_subsets`` pairs of random subsets of
    ``m = min(subset_size, N1, N2)`` samples each, drawn without replacement by
    ``np.random.RandomState(seed)``. Per subset pair the estimator is
    ``sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``
    (torch-fidelity's ``mmd_est="unbiased"``), so it can be slightly negative for samples of one
    distribution. Returns ``(mean, std)``.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    x, y = _feature_pair(f1, f2, "KID")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    out = kid_features_to_metric(
        x, y, kid_subsets=num_subsets, kid_subset_size=m, kid_kernel="poly", kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls (k = 3).

    Computed by torch-fidelity's ``prc_features_to_metric`` on float64 CPU copies of the features
    (fake as its ``features_1``, real as ``features_2``), in row blocks of 1024 samples
    (``save_cpu_ram``) rather than full ``N x N`` distance matrices. Each sample's ball has the
    Euclidean distance to its k-th nearest other sample of the same set as radius (the k+1-th
    smallest distance, the point itself being the first); a boundary point counts as inside.
    Precision: share of fake samples inside some real sample's ball; recall: share of real samples
    inside some fake sample's ball. ``device``: where the float64 distances are computed (default:
    the CPU; a GPU gives the same 0/1 hits up to ties at the rounding level, in a fraction of the time).
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    r, f = _feature_pair(real, fake, "precision/recall")
    if device is not None:
        r, f = r.to(device), f.to(device)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(r)} and {len(f)}")
    out = prc_features_to_metric(f, r, prc_neighborhood=k, prc_batch_size=1024, save_cpu_ram=True, verbose=False)
    # torch-fidelity averages the 0/1 hits in float32; the counts are exact, so restore count / N
    return round(out[KEY_METRIC_PRECISION] * len(f)) / len(f), round(out[KEY_METRIC_RECALL] * len(r)) / len(r)
