"""The fine-tuning config: the shared re-ID sections (:mod:`passreid.config.reid`) plus what supervised
fine-tuning adds (loss, schedule, the methods' own sections).

Defaults are the PASS ViT-S/16 recipe (PASS-reID: PASS_transreid/configs/market/vit_small.yml and
model/make_model.py, ``build_transformer_pass``): PASS head with four BN
necks and ``cat`` fusion, pre-BN test feature, CE (no label smoothing) + soft-margin batch-hard
triplet 1:1, SGD lr 4e-4 with 20 warm-up epochs and cosine to 0.002x over 120 epochs, PASS's
end-of-epoch scheduler stepping. Recipes in ``configs/finetune/`` change only what differs.

The settings of one method (``dpm:``, ``bpbreid:``, ``pass_parts:``, ``tsd:``, ``dpeformer:``) are not defined
here: each is a dataclass in its method's module, registered with the method
(``FinetuneMethod(section="dpm", section_type=DPMConfig, ...)``, :mod:`passreid.finetune.methods`).
:class:`FinetuneConfig` has one plain, typed field per registered section, so the YAML keys, the loader's
key and type checks and ``config.yaml`` are those of any other section, and every section is always present
(a recipe may set a section of a method it does not select; it is kept and saved, and checked by the method's
``validate`` only when that method runs). Importing this module checks that these fields and the registry
agree. This module imports the registry (which imports every method module); the method modules import
``FinetuneConfig`` for type annotations only, so there is no import cycle.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from passreid.config import require
from passreid.config.reid import ReIDDataConfig, ReIDModelConfig, ReIDTrainConfig, validate_reid_sections
from passreid.config.schema import EvalConfig, OptimConfig
from passreid.data import list_datasets
# The registry first: importing it imports and registers every method module (in the order it chooses).
from passreid.finetune.methods import get_method, list_methods, method_sections
from passreid.finetune.bpbreid import BPBReIDConfig
from passreid.finetune.dpeformer import DPEFormerConfig
from passreid.finetune.dpm import DPMConfig
from passreid.finetune.pass_parts import PassPartsConfig
from passreid.finetune.tsd import TSDConfig
from passreid.models.cnn import is_cnn_arch

__all__ = [
    "FinetuneConfig",
    "FinetuneOptimConfig",
    "LossConfig",
    "validate_config",
]


@dataclass
class LossConfig:
    """Identity cross-entropy on post-BN features + batch-hard triplet on pre-BN features."""

    id_weight: float = 1.0
    triplet_weight: float = 1.0
    label_smoothing: float = 0.0  # epsilon; 0 = off, as in every ViT recipe (0.1 when on)
    triplet: Literal["soft_margin", "margin"] = "soft_margin"
    margin: float = 0.3  # only for triplet: margin


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """Shared optimiser fields plus the scheduler stepping convention.

    TransReID steps the scheduler at the start of each epoch (TransReID: processor/processor.py), PASS at its
    end (PASS-reID: PASS_transreid/processor/processor.py).
    """

    # "pass": epoch e (0-based) runs at the schedule value of e (step at epoch end; epoch 1 at warmup_lr_init).
    # "transreid": epoch e runs at the value of e + 1 (step(epoch) at the start of epochs 1..E).
    lr_stepping: Literal["pass", "transreid"] = "pass"
    # "cosine": warm-up + cosine (above fields); "warmup_multistep": linear warm-up from lr x warmup_lr_factor over
    # warmup_epochs, then x gamma at each epoch in milestones (torchreid / BPBReID: 10 epochs, [40, 70], 0.1).
    scheduler: Literal["cosine", "warmup_multistep"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run reads; saved as ``config.yaml`` and inside every checkpoint."""

    method: str = "bnneck"  # a name from passreid.finetune.list_methods()
    model: ReIDModelConfig = field(default_factory=ReIDModelConfig)
    data: ReIDDataConfig = field(default_factory=ReIDDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: ReIDTrainConfig = field(default_factory=ReIDTrainConfig)
    # The methods' own sections: one field per registered section (FinetuneMethod.section / section_type),
    # named and typed as registered; _check_method_sections below keeps the two lists equal.
    dpm: DPMConfig = field(default_factory=DPMConfig)
    bpbreid: BPBReIDConfig = field(default_factory=BPBReIDConfig)
    pass_parts: PassPartsConfig = field(default_factory=PassPartsConfig)
    tsd: TSDConfig = field(default_factory=TSDConfig)
    dpeformer: DPEFormerConfig = field(default_factory=DPEFormerConfig)


#: The FinetuneConfig fields every method reads; every other field is a registered method's own section.
SHARED_SECTIONS = ("method", "model", "data", "loss", "optim", "eval", "train")


def _check_method_sections() -> None:
    """FinetuneConfig's method fields are exactly the registered sections, each with the registered dataclass
    (a method added without its field, or a field left after its method went, fails at import)."""
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    registered = method_sections()
    own = {name: f for name, f in fields.items() if name not in SHARED_SECTIONS}
    if set(own) != set(registered):
        raise TypeError(f"FinetuneConfig's method sections {sorted(own)} differ from the sections the fine-tuning "
                        f"methods register {sorted(registered)}")
    for name, section_type in registered.items():
        default = own[name].default_factory()
        if type(default) is not section_type:
            raise TypeError(f"FinetuneConfig.{name} defaults to {type(default).__name__}, but its method registers "
                            f"section_type {section_type.__name__}")


_check_method_sections()


def validate_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check the value ranges and combinations a type check cannot; raise ``ConfigError`` naming the key."""
    model, loss, optim = cfg.model, cfg.loss, cfg.optim
    require(not is_cnn_arch(model.arch) or cfg.method == "bpbreid", "model.arch",
             f"{model.arch} is a CNN feature-map backbone, used by method bpbreid only (method is {cfg.method!r}); "
             "the other methods need a ViT (vit_tiny, vit_small, vit_base)")
    validate_reid_sections(model, cfg.data, cfg.train, cfg.eval, list_datasets())
    require(list(optim.milestones) == sorted(optim.milestones), "optim.milestones",
             f"must be increasing epochs, got {optim.milestones}")
    require(0.0 <= loss.label_smoothing < 1.0, "loss.label_smoothing",
             f"must be in [0, 1), got {loss.label_smoothing}")
    require(loss.id_weight >= 0 and loss.triplet_weight >= 0, "loss.id_weight", "loss weights must be >= 0")
    require(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    require(optim.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {optim.warmup_epochs}")
    require(cfg.method in list_methods(), "method", f"unknown method {cfg.method!r}; one of {', '.join(list_methods())}")
    method = get_method(cfg.method)
    if method.section is not None and not isinstance(getattr(cfg, method.section, None), method.section_type):
        # A method registered after this module was imported (outside the package) without its field.
        raise TypeError(f"method {method.name!r} registers config section {method.section!r} "
                        f"({method.section_type.__name__}), which FinetuneConfig has no field for")
    require(method.sie_and_jpm or not (model.sie_camera or model.jpm), "model.sie_camera",
            f"method {method.name} does not combine with model.sie_camera or model.jpm: set both to false")
    if method.validate is not None:  # the method's own config section, checked only when the method runs
        method.validate(cfg)
    return cfg
