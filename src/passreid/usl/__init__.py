"""Cluster Contrast for unsupervised (USL) and domain-adaptive (UDA) re-ID from PASS checkpoints.

As a library::

    cfg = load_config(UslConfig, "configs/usl/demo.yaml", ["train.output_dir=runs/usl",
                                                           "model.pretrained=runs/pretrain/backbone_final.pth"])
    result = run_usl(cfg)          # clusters, trains, evaluates, writes model_final.pth (re-ID model file)
    model, ft_cfg, _ = passreid.finetune.load_finetuned_model(result.final_model)

UDA is the same loop started from a source-trained ``finetune/`` model: :mod:`passreid.uda`.
"""
from passreid.usl.config import (ClusterConfig, MemoryConfig, UslConfig, UslDataConfig, UslModelConfig, UslOptimConfig,
                                 UslTrainConfig, validate_usl_config)
from passreid.usl.memory import ClusterMemory, hard_momentum_update, momentum_update
from passreid.usl.model import ClusterContrastNet, build_usl_model
from passreid.usl.pseudo_labels import (ClusterStats, NoClustersError, PseudoLabels, cluster_centroids, cluster_features,
                                        cluster_statistics)
from passreid.usl.sampler import PseudoLabelSampler
from passreid.usl.trainer import ClusterContrastTrainer, TargetData, UslResult, load_target_data, run_usl

__all__ = [
    "ClusterConfig",
    "ClusterContrastNet",
    "ClusterContrastTrainer",
    "ClusterMemory",
    "ClusterStats",
    "MemoryConfig",
    "NoClustersError",
    "PseudoLabelSampler",
    "PseudoLabels",
    "TargetData",
    "UslConfig",
    "UslDataConfig",
    "UslModelConfig",
    "UslOptimConfig",
    "UslResult",
    "UslTrainConfig",
    "build_usl_model",
    "cluster_centroids",
    "cluster_features",
    "cluster_statistics",
    "hard_momentum_update",
    "load_target_data",
    "momentum_update",
    "run_usl",
    "validate_usl_config",
]
