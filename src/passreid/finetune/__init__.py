"""Supervised re-ID fine-tuning of a (PASS / DINO / ImageNet / random) ViT backbone.

Three calls as a library::

    cfg = load_config(FinetuneConfig, "configs/finetune/demo.yaml", ["train.output_dir=runs/ft"])
    result = run_training(cfg)                                  # trains, evaluates, writes model_final.pth
    model, cfg, _ = load_finetuned_model("runs/ft/model_final.pth")

Methods are selected by ``method:`` in the config (:func:`list_methods`; ``bnneck`` is the
TransReID-family recipe with the PASS head, SIE and JPM options); new ones plug in with
:func:`register_method`.
"""
from passreid.engine.optim import build_param_groups
from passreid.eval.evaluator import EvalResult, evaluate_features, evaluate_model, extract_split
from passreid.finetune.checkpoints import build_final_checkpoint, load_finetuned_model
from passreid.finetune.published_checkpoints import load_published_checkpoint, map_published_state_dict
from passreid.finetune.config import FinetuneConfig, FinetuneOptimConfig, LossConfig, validate_config
from passreid.finetune.data import FinetuneData, load_finetune_data
from passreid.finetune.methods import (FinetuneMethod, build_criterion, build_model, get_method, list_methods,
                                       register_method)
from passreid.finetune.optim import epoch_learning_rates, schedule_epoch
from passreid.finetune.testing import EvaluationOutputs, run_test
from passreid.finetune.trainer import FinetuneTrainer, TrainResult, run_training
from passreid.losses.reid import ReIDCriterion, ReIDTrainOutput, batch_hard_triplet_loss, euclidean_dist
from passreid.models.reid import JigsawBranches, ReIDModel, TokenHead, jigsaw_rearrange

__all__ = [
    "EvalResult",
    "EvaluationOutputs",
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneMethod",
    "FinetuneOptimConfig",
    "FinetuneTrainer",
    "JigsawBranches",
    "LossConfig",
    "ReIDCriterion",
    "ReIDModel",
    "ReIDTrainOutput",
    "TokenHead",
    "TrainResult",
    "batch_hard_triplet_loss",
    "build_criterion",
    "build_final_checkpoint",
    "build_model",
    "build_param_groups",
    "euclidean_dist",
    "epoch_learning_rates",
    "evaluate_features",
    "evaluate_model",
    "extract_split",
    "get_method",
    "jigsaw_rearrange",
    "list_methods",
    "load_finetune_data",
    "load_finetuned_model",
    "load_published_checkpoint",
    "map_published_state_dict",
    "register_method",
    "run_test",
    "run_training",
    "schedule_epoch",
    "validate_config",
]
