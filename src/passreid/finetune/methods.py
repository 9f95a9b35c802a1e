"""Fine-tuning methods, selected by ``method:`` in the config.

A method says how to build the model and its criterion; the trainer, evaluator and checkpoints are
shared. ``bnneck`` is the TransReID-family supervised recipe (PASS head or plain [CLS] head, optional
SIE and JPM). An occluded method (e.g. DPM) registers itself the same way::

    register_method(FinetuneMethod("dpm", "Dynamic Prototype Mask", build_dpm_model, build_dpm_criterion))

``build_model(cfg, num_classes, num_cameras, load_weights)`` returns a module whose training forward
gives a :class:`~passreid.losses.reid.ReIDTrainOutput` (extra loss terms go in ``extra_losses``)
and whose eval forward gives the test feature; ``load_weights=False`` is used when the weights come
from a fine-tuned checkpoint instead of ``model.pretrained``. The training forward receives the
images, ``camids=`` and every extra field of the training batch as keyword arguments (e.g. ``masks=``
when the method's data pipeline loads part masks). With N > 1 processes and ``train.ddp_batch: global``
the trainer gathers every tensor of the training output from all processes before the criterion
(:func:`passreid.dist.gather_batch`), so the output must hold per-sample tensors only (non-tensor
leaves, e.g. a memory module, pass unchanged) and the criterion sees the whole global batch.

``build_test_distance(cfg, query, gallery, device)`` is optional: methods whose test distance is not
the normalised Euclidean distance of one feature vector (DPM's query-masked distance, part distances
over mutually visible parts) pack what they need into the eval-forward output (one row per image) and
return a query-chunked distance function over the two
:class:`~passreid.eval.features.ExtractedFeatures` (see :mod:`passreid.eval.distance`).

``build_second_pass(model, cfg)`` is optional too: a :class:`SecondPass` names parameters that the main
optimizer leaves out and that the trainer steps with their own optimizer in a second forward/backward
pass of every iteration (DPM's mask generator, :mod:`passreid.finetune.dpm`).

A method with settings of its own owns a config section: a dataclass defined in the method's module
(e.g. ``DPMConfig`` in :mod:`passreid.finetune.dpm`), named by ``section`` (its top-level YAML key,
``dpm:``) and ``section_type`` (the dataclass). :class:`~passreid.finetune.config.FinetuneConfig` has one
field per registered section, of that name and type, so recipes write ``dpm.orth_weight`` as before
and the loader checks the section's keys and types like any other; importing
:mod:`passreid.finetune.config` checks that the fields and the registry agree. ``validate(cfg)`` checks
the section's value ranges when the method is selected. Importing this module imports every method
module; they and this module import ``FinetuneConfig`` for type annotations only, because
:mod:`passreid.finetune.config` imports this registry to get the section dataclasses.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from passreid.eval.evaluator import TestDistanceBuilder
from passreid.losses.reid import ReIDCriterion
from passreid.models.factory import build_reid_model
from passreid.models.reid import ReIDModel

if TYPE_CHECKING:  # annotations only: passreid.finetune.config imports this registry for the method sections
    from passreid.finetune.config import FinetuneConfig

__all__ = [
    "FinetuneMethod",
    "SecondPass",
    "build_criterion",
    "build_model",
    "get_method",
    "list_methods",
    "method_sections",
    "register_method",
]


ModelBuilder = Callable[["FinetuneConfig", int, int, bool], nn.Module]
CriterionBuilder = Callable[["FinetuneConfig"], nn.Module]


@dataclass(frozen=True)
class SecondPass:
    """Parameters the main optimizer leaves alone, stepped by ``optimizer`` in a second pass of each iteration.

    After the main step the trainer recomputes the forward and the loss and steps only these parameters
    (gradients of the same loss, no learning-rate schedule); DPM's mask generator (DPM: processor/processor.py,
    solver/make_optimizer.py).
    """

    names: frozenset[str]  # parameter names of the (unwrapped) model
    optimizer: torch.optim.Optimizer


SecondPassBuilder = Callable[[nn.Module, "FinetuneConfig"], SecondPass]


@dataclass(frozen=True)
class FinetuneMethod:
    """A named way to build the fine-tuning model and its loss."""

    name: str
    description: str
    build_model: ModelBuilder
    build_criterion: CriterionBuilder
    build_test_distance: TestDistanceBuilder | None = None  # None: feature distance of eval.metric
    build_second_pass: SecondPassBuilder | None = None  # None: one forward/backward/step per iteration
    # What the training batches carry as ``masks`` (None: nothing): "parsing" = the dataset's parsing masks
    # (passreid.data.masks), "constant" = an all-foreground mask shaped only by the augmentation.
    train_masks: Callable[[FinetuneConfig], str | None] | None = None
    # Optional own training set ``(items, cfg) -> Dataset`` (e.g. DPEFormer's two views per sample, returned as
    # ``img`` and ``view2``); None: the shared pipeline of passreid.finetune.data.build_train_set.
    build_train_set: Callable[[list, FinetuneConfig], object] | None = None
    # The method's own config section: ``section`` is its top-level key (a FinetuneConfig field of that name),
    # ``section_type`` the dataclass of its keys, defined in the method's module. None: no settings of its own.
    section: str | None = None
    section_type: type | None = None
    # Checks of the method's own config section (raise ConfigError naming the key); run by validate_config
    # only when this method is selected.
    validate: Callable[[FinetuneConfig], None] | None = None
    # False: the method's heads take neither the camera embedding (model.sie_camera) nor JPM (model.jpm);
    # validate_config refuses them with the method.
    sie_and_jpm: bool = True

    def __post_init__(self) -> None:
        if (self.section is None) != (self.section_type is None):
            raise ValueError(f"fine-tuning method {self.name!r}: give both section and section_type, or neither")
        if self.section_type is not None and not (isinstance(self.section_type, type)
                                                  and dataclasses.is_dataclass(self.section_type)):
            raise TypeError(f"fine-tuning method {self.name!r}: section_type must be a dataclass type, "
                            f"got {self.section_type!r}")
        if self.section is not None and not self.section.isidentifier():
            raise ValueError(f"fine-tuning method {self.name!r}: section must be a config key, got {self.section!r}")


_METHODS: dict[str, FinetuneMethod] = {}


def register_method(method: FinetuneMethod) -> FinetuneMethod:
    """Add ``method`` to the registry (names and config sections are unique).

    A method registered with a ``section`` needs the :class:`~passreid.finetune.config.FinetuneConfig` field of
    that name and type; :func:`~passreid.finetune.config.validate_config` refuses the method otherwise.
    """
    if method.name in _METHODS:
        raise ValueError(f"fine-tuning method {method.name!r} is already registered")
    owners = {other.section: other.name for other in _METHODS.values() if other.section is not None}
    if method.section in owners:
        raise ValueError(f"fine-tuning method {method.name!r}: config section {method.section!r} already belongs "
                         f"to method {owners[method.section]!r}")
    _METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    """Names accepted by ``method:`` in a fine-tuning config."""
    return sorted(_METHODS)


def get_method(name: str) -> FinetuneMethod:
    """The registered method ``name``; unknown names list the valid ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; registered methods: {', '.join(list_methods())}")
    return _METHODS[name]


def method_sections() -> dict[str, type]:
    """Config section key -> its dataclass, for every registered method that has a section."""
    return {method.section: method.section_type for method in _METHODS.values() if method.section is not None}


def build_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int, load_weights: bool = True) -> nn.Module:
    """The model of ``cfg.method`` for ``num_classes`` training identities and ``num_cameras`` cameras."""
    return get_method(cfg.method).build_model(cfg, num_classes, num_cameras, load_weights)


def build_criterion(cfg: FinetuneConfig) -> nn.Module:
    """The loss of ``cfg.method``."""
    return get_method(cfg.method).build_criterion(cfg)


# ------------------------------------------------------------------------------------------ bnneck


def build_bnneck_model(cfg: FinetuneConfig, num_classes: int, num_cameras: int, load_weights: bool = True) -> ReIDModel:
    """ViT + BNNeck head (PASS or [CLS]), SIE when ``model.sie_camera``, JPM when ``model.jpm``
    (:func:`passreid.models.factory.build_reid_model` of ``cfg.model``)."""
    return build_reid_model(cfg.model, num_classes, num_cameras, load_weights)


def build_reid_criterion(cfg: FinetuneConfig) -> ReIDCriterion:
    """CE (+ optional label smoothing) and batch-hard triplet (soft margin or a margin), weighted."""
    loss = cfg.loss
    return ReIDCriterion(
        id_weight=loss.id_weight,
        triplet_weight=loss.triplet_weight,
        label_smoothing=loss.label_smoothing,
        triplet_margin=None if loss.triplet == "soft_margin" else loss.margin,
    )


register_method(
    FinetuneMethod(
        name="bnneck",
        description="ViT + BNNeck (PASS [CLS]+part necks or plain [CLS]), CE + batch-hard triplet; optional SIE, JPM",
        build_model=build_bnneck_model,
        build_criterion=build_reid_criterion,
    )
)

# Methods in their own modules register on import (they use the names defined above).
from passreid.finetune import bpbreid as _bpbreid  # noqa: E402,F401
from passreid.finetune import dpeformer as _dpeformer  # noqa: E402,F401
from passreid.finetune import dpm as _dpm  # noqa: E402,F401
from passreid.finetune import pass_parts as _pass_parts  # noqa: E402,F401
from passreid.finetune import tsd as _tsd  # noqa: E402,F401
