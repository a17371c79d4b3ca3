"""AC: Activation Clustering as a defense (Chen et al., "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", 2018; BackdoorBench's ``ac``, extra-defenses §11.6). No clean data.

Within the class the attack targets, the poisoned samples are recognised by the backdoored model for
another reason than the clean ones, so that class's activations split into two clusters, one of them
small. For every class (by the poisoned label):

1. take the activations the classification layer reads (eval mode, no augmentation);
2. reduce them to ``nb_dims`` with PCA (when the class has more samples and dimensions than that);
3. cluster them with ``nb_clusters``-means;
4. ``cluster_analysis: smaller`` marks the smallest cluster as poison (``relative-size``: every
   cluster holding less than ``size_threshold`` of the class);

then retrain a **fresh** model on the samples not marked, for ``epochs``.

BackdoorBench's version does not do this (§11.6, not copied): it clusters each mini-batch on its
own, never runs the PCA (its size test is always false) so it clusters the first 10 raw dimensions,
takes the activations under augmentation, and maps the decisions back through a reshuffled pass, so
they land on unrelated samples. :func:`activation_clusters` and :func:`poison_clusters` are the
reusable detection parts.

Files: ``ac_df.csv`` / ``_summary`` (the retraining's epochs, FT columns), ``ac_samples.csv``
(cluster, marked, ground-truth poison flag), ``ac_report.json``.

Example:
    python defense/ac.py --result_file badnet_cifar10
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..config import option
from ..data import ImageSet
from ..defense import Defense, DefenseData, DefenseRun, register_defense
from ..errors import BurnError
from ..models import Classifier
from ..network_surgery import penultimate_features
from .retraining import (RetrainConfig, poisoned_train, poisoned_train_size,
                         retrain_on_kept, write_sample_flags)

ANALYSES = ("smaller", "relative-size")
BB_UNUSED_KEYS = ("data_root", "seed", "poison_rate", "target_type", "target_label", "num_classes",
                  "input_height", "input_width", "input_channel")


@dataclass
class ACConfig(RetrainConfig):
    YAML_COMPAT_KEYS: ClassVar[tuple[str, ...]] = BB_UNUSED_KEYS
    nb_dims: int = option(10, "PCA dimensions the activations are reduced to", low=1)
    nb_clusters: int = option(2, "clusters per class", low=2)
    cluster_analysis: str = option("smaller", "which clusters are poison: smaller (the smallest) or relative-size "
                                              "(those under size_threshold of the class)", choices=ANALYSES)
    size_threshold: float = option(0.35, "relative-size: clusters below this share of their class are poison",
                                   above=0, high=1)


def activation_clusters(features: np.ndarray, nb_dims: int, nb_clusters: int, seed: int) -> np.ndarray:
    """Cluster ids of one class's activations: PCA to ``nb_dims`` (when there are more samples and
    dimensions than that), then k-means with ``nb_clusters`` (k-means++ , 10 restarts, seeded)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if len(x) < nb_clusters:
        return np.zeros(len(x), dtype=np.int64)
    if x.shape[1] > nb_dims and len(x) > nb_dims:
        x = PCA(n_components=nb_dims, random_state=seed).fit_transform(x)
    return KMeans(n_clusters=nb_clusters, n_init=10, random_state=seed).fit_predict(x).astype(np.int64)


def poison_clusters(cluster_ids: np.ndarray, nb_clusters: int, analysis: str = "smaller",
                    size_threshold: float = 0.35) -> np.ndarray:
    """Boolean mask of the samples in the clusters judged poison (see the module docstring); ties
    in size go to the lowest cluster id."""
    sizes = np.bincount(cluster_ids, minlength=nb_clusters)
    if len(cluster_ids) == 0:
        return np.zeros(0, dtype=bool)
    if analysis == "smaller":
        present = np.flatnonzero(sizes)
        if len(present) < 2:  # a single cluster: nothing stands out
            return np.zeros(len(cluster_ids), dtype=bool)
        poison = [present[np.argmin(sizes[present])]]
    elif analysis == "relative-size":
        poison = np.flatnonzero((sizes > 0) & (sizes / len(cluster_ids) < size_threshold))
    else:
        raise BurnError(f"--cluster_analysis must be one of {', '.join(ANALYSES)}, got {analysis!r}")
    return np.isin(cluster_ids, poison)


def activation_clustering(model: Classifier, train: ImageSet, cfg: ACConfig, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(poison mask, cluster id) over ``train``, class by class (by the labels the samples carry)."""
    feats = penultimate_features(model, model.net, train, device, cfg.batch_size, cfg.amp).numpy()
    labels = train.labels.cpu().numpy()
    flagged = np.zeros(len(train), dtype=bool)
    clusters = np.full(len(train), -1, dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        ids = activation_clusters(feats[members], cfg.nb_dims, cfg.nb_clusters, cfg.random_seed)
        clusters[members] = ids
        flagged[members] = poison_clusters(ids, cfg.nb_clusters, cfg.cluster_analysis, cfg.size_threshold)
    return torch.from_numpy(flagged), torch.from_numpy(clusters)


def ac_defense(model: Classifier, data: DefenseData, cfg: ACConfig, run: DefenseRun) -> Classifier:
    train = poisoned_train(data, "AC")
    with run.timed("detect"):
        flagged, clusters = activation_clustering(model, train, cfg, run.device)
    write_sample_flags(run, train, flagged, clusters.double(), "ac")
    run.extra_results["test_data_for_decisions"] = False
    return retrain_on_kept(run, train.subset(torch.nonzero(~flagged).flatten()), cfg)


@register_defense
class ActivationClustering(Defense):
    """AC: cluster each class's activations, remove the small cluster, retrain from scratch."""

    name = "ac"
    config_cls = ACConfig
    needs_clean_subset = False
    budget_keys: ClassVar[tuple[str, ...]] = ("epochs",)

    def repair(self, model, data, cfg, run):
        return ac_defense(model, data, cfg, run)

    def preflight(self, cfg, record, out_dir):
        poisoned_train_size(record, "AC")
