"""passreid fine-tuned models rewritten in the key layouts of the released code, for the loading tests.

Each function returns the ``model.state_dict()`` the released training code would save for the same weights
(DPM model/make_model.py + model/backbones/vit_pytorch.py, TSD model/tsd.py + model/neck/*, DPEFormer
model/make_model_zx.py + model/backbones/vit_pytorch.py), including the modules their forward never uses
(filled with noise, so loading them anywhere would show), and the torchreid checkpoint of BPBReID (bpbreid
torchreid/models/bpbreid.py, hrnet.py, resnet.py, torchreid/engine/engine.py save_model, with its yacs config).
The renames are written out here from the released module names, independently of passreid's mapping rules.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import torch


def _noise(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _base(state: dict[str, torch.Tensor], depth: int, b1: bool) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The TransReID ViT ``base`` (the [CLS] slot inside ``pos_embed``, ``sie_embed``, the ImageNet classifier
    ``fc`` of 1000 classes); with ``b1`` the released forward uses copies of the last block and LN, so the
    base's own ones are stale. Returns the released keys and the passreid keys consumed."""
    dim = state["backbone.cls_token"].shape[-1]
    out = {"base.pos_embed": torch.cat([state["backbone.cls_pos"], state["backbone.pos_embed"]], dim=1),
           "base.fc.weight": _noise(1000, dim), "base.fc.bias": _noise(1000)}
    used = {"backbone.cls_pos", "backbone.pos_embed"}
    if "sie_embed" in state:
        out["base.sie_embed"] = state["sie_embed"]
        used.add("sie_embed")
    last = f"backbone.blocks.{depth - 1}."
    for key, value in state.items():
        if not key.startswith("backbone.") or key in used:
            continue
        used.add(key)
        rest = key[len("backbone."):]
        if b1 and key.startswith(last):
            out["b1.0." + key[len(last):]] = value
            out["base." + rest] = torch.randn_like(value)
        elif b1 and key.startswith("backbone.norm."):
            out["b1.1." + key[len("backbone.norm."):]] = value
            out["base." + rest] = torch.randn_like(value)
        else:
            out["base." + rest] = value
    return out, used


def _rename(state: dict[str, torch.Tensor], used: set[str], table: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Every passreid key not yet used, renamed by the first matching (passreid prefix, released prefix)."""
    out = {}
    for key, value in state.items():
        if key in used:
            continue
        prefix = next((p for p, _ in table if key.startswith(p)), None)
        if prefix is None:
            raise AssertionError(f"no released name for {key}")
        out[dict(table)[prefix] + key[len(prefix):]] = value
    return out


def dpm_released_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DPM build_transformer: ``base`` (TransReID ViT + ``ConvLayer`` mask generator + ``attfc``), ``bottleneck``,
    ``classifier`` (MArcface: weight only)."""
    state = model.state_dict()
    out, used = _base(state, model.backbone.depth, b1=False)
    return {**out, **_rename(state, used, [("mask_generator.convs.", "base.ConvLayer."),
                                           ("mask_generator.fc.", "base.attfc."),
                                           ("head.necks.0.", "bottleneck."), ("head.classifier.", "classifier.")])}


def tsd_released_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """TSD build_transformer_tsd: ``base`` (local_feature: all but the last block), ``b1`` (copy of the last block +
    LN), ``part_decoder`` (PartDecoder1 with an unused ``post_norm``), ``query_embedding`` (nn.Embedding) and heads."""
    state = model.state_dict()
    out, used = _base(state, model.backbone.depth, b1=True)
    dim = state["backbone.cls_token"].shape[-1]
    out.update({"part_decoder.post_norm.weight": _noise(dim), "part_decoder.post_norm.bias": _noise(dim),
                "query_embedding.weight": state["query_embedding"]})
    used.add("query_embedding")
    return {**out, **_rename(state, used, [
        ("global_neck.", "bottleneck."), ("global_classifier.", "classifier."), ("memory_norm.", "memory_post_norm."),
        ("decoder.self_attention.", "part_decoder.gp_self_attention."),
        ("decoder.cross_attention.", "part_decoder.cross_attention."),
        ("decoder.norm1.", "part_decoder.norm1."), ("decoder.norm2.", "part_decoder.norm2."),
        ("decoder.ffn.0.", "part_decoder.ffn.layers.0.0."), ("decoder.ffn.2.", "part_decoder.ffn.layers.1."),
        ("part_neck.", "bottleneck_part."), ("part_classifier.", "classifier_part."),
        ("pooled_neck.", "bottleneck_partm."), ("pooled_classifier.", "classifier_partm."),
        ("fore_neck.", "bottleneck_fg."), ("fore_classifier.", "classifier_fg."),
        ("visibility_head.", "visb_pred."), ("pixel_classifier.", "pixel_classifier.")])}


def dpeformer_released_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DPEFormer build_transformer under DataParallel (``module.``): ``base``, ``b2`` (4 unused copies of the last
    block + LN), ``bottleneck_local`` (10 BNs: 0-3 stripes, 4-7 parts), ``classifier_local`` (10: 4-7 parts),
    ``classifier1`` / ``classifier1_4`` / ``classifier3`` and unused ones, ``attention_global`` (fbm_qkv: its own
    norm1/norm2/attn/param unused, ``Block`` = Block_zx), the unused ``REM_zx``, ``ffn2``/``ffn3``, stage-2 and
    global BNs. The class-centroid memory is saved in a file of its own (not here)."""
    state = model.state_dict()
    depth = model.backbone.depth
    out, used = _base(state, depth, b1=False)
    dim = state["backbone.cls_token"].shape[-1]
    classes = state["global_classifier.weight"].shape[0]
    used.add("memory.features")
    table = [("part_concat_classifier.", "classifier1_4."), ("stripe_classifier.", "classifier1."),
             ("global_classifier.", "classifier3.")]
    for k in range(4):
        table += [(f"stripe_necks.{k}.", f"bottleneck_local.{k}."), (f"part_necks.{k}.", f"bottleneck_local.{k + 4}."),
                  (f"part_classifiers.{k}.", f"classifier_local.{k + 4}.")]
        fbm = f"attention_global.{k}."
        table += [(f"blending.{k}.pos_embed", fbm + "pos_embed"), (f"blending.{k}.norm_part.", fbm + "Block.norm1."),
                  (f"blending.{k}.norm_global.", fbm + "Block.norm2."), (f"blending.{k}.norm_mlp.", fbm + "Block.norm3."),
                  (f"blending.{k}.q.", fbm + "Block.attn.q."), (f"blending.{k}.kv.", fbm + "Block.attn.kv."),
                  (f"blending.{k}.proj.", fbm + "Block.attn.proj."), (f"blending.{k}.mlp.0.", fbm + "Block.mlp.fc1."),
                  (f"blending.{k}.mlp.2.", fbm + "Block.mlp.fc2.")]
        token = state[f"blending.{k}.q.weight"].shape[0]
        out.update({fbm + "norm1.weight": _noise(token), fbm + "norm2.bias": _noise(token),
                    fbm + "attn.q.weight": _noise(token, token), fbm + "param": _noise(1),
                    fbm + "Block.attn.param": _noise(1), f"REM_zx.{k}.conv_query.weight": _noise(dim, dim),
                    f"bottleneck_local_stage2.{k}.weight": _noise(dim)})
        for layer, name in ((f"backbone.blocks.{depth - 1}.attn.qkv.weight", "0.attn.qkv.weight"),
                            ("backbone.norm.weight", "1.weight")):
            out[f"b2.{k}.{name}"] = torch.randn_like(state[layer])
    for index in (0, 1, 2, 3, 8, 9):
        out[f"classifier_local.{index}.weight"] = _noise(classes, dim)
    out.update({"bottleneck_local.8.weight": _noise(dim), "bottleneck_local.9.running_mean": _noise(dim),
                "bottleneck_global.weight": _noise(dim), "classifier1_2.weight": _noise(classes, 2 * dim),
                "classifier1_3.weight": _noise(classes, 3 * dim), "classifier2.weight": _noise(classes, 3 * dim),
                "ffn2.layers2.norm.weight": _noise(dim), "ffn3.layers2.fn.net.0.weight": _noise(8 * dim, dim)})
    released = {**out, **_rename(state, used, table)}
    return {f"module.{key}": value for key, value in released.items()}


def bpbreid_released_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BPBreID with ``dim_reduce: after_pooling`` (the published default): ``backbone_appearance_feature_extractor``
    (HRNet-W32 with its ``cls_head``, Conv 1920 -> 512 + BN, run only with ``before_pooling``; ResNet-50 with its
    ``classifier`` Linear(2048, classes)), ``{global, foreground, background, parts}_after_pooling_dim_reduce``
    (``layers``: Linear, BN1d, ReLU), ``pixel_classifier``, the BNClassifiers ``{global, background, foreground,
    concat_parts}_identity_classifier`` and ``parts_identity_classifier.k``; background ones unused at test."""
    state = model.state_dict()
    dim, channels = model.dim_reduce, model.pixel_classifier.bn.num_features
    classes = state["global_classifier.classifier.weight"].shape[0]
    table = [("backbone.", "backbone_appearance_feature_extractor."), ("pixel_classifier.", "pixel_classifier."),
             ("global_classifier.", "global_identity_classifier."),
             ("foreground_classifier.", "foreground_identity_classifier."),
             ("concat_classifier.", "concat_parts_identity_classifier."),
             ("parts_classifiers.", "parts_identity_classifier.")]
    for kind in ("global", "foreground", "parts"):
        table += [(f"{kind}_reduction.linear.", f"{kind}_after_pooling_dim_reduce.layers.0."),
                  (f"{kind}_reduction.bn.", f"{kind}_after_pooling_dim_reduce.layers.1.")]
    out = _rename(state, set(), table)
    backbone = "backbone_appearance_feature_extractor."
    hrnet = f"{backbone}transition1.0.0.weight" in out
    batch_norms = ["background_after_pooling_dim_reduce.layers.1.", "background_identity_classifier.bn."]
    for name in batch_norms + ([f"{backbone}cls_head.1."] if hrnet else []):
        out.update({name + stat: _noise(dim) for stat in ("weight", "bias", "running_mean", "running_var")})
        out[name + "num_batches_tracked"] = torch.tensor(9000)
    out.update({"background_after_pooling_dim_reduce.layers.0.weight": _noise(dim, channels),
                "background_after_pooling_dim_reduce.layers.0.bias": _noise(dim),
                "background_identity_classifier.classifier.weight": _noise(classes, dim)})
    if hrnet:
        out.update({f"{backbone}cls_head.0.weight": _noise(dim, channels, 1, 1), f"{backbone}cls_head.0.bias": _noise(dim)})
    else:
        out.update({f"{backbone}classifier.weight": _noise(classes, channels), f"{backbone}classifier.bias": _noise(classes)})
    return out


def bpbreid_released_checkpoint(model: torch.nn.Module, config: dict | None = None) -> dict:
    """torchreid's Engine.save_model dict of ``model`` (trained under nn.DataParallel: ``module.`` keys), with the
    numpy metrics, Adam and warm-up scheduler states and, given, the yacs config (a :func:`yacs_config` node)."""
    return {"state_dict": {f"module.{k}": v for k, v in bpbreid_released_state(model).items()},
            "epoch": 120, "rank1": np.float32(0.957), "mAP": np.float64(0.894), "ssmd": np.float64(2.5),
            "optimizer": {"state": {}, "param_groups": [{"lr": 3.5e-6, "betas": (0.9, 0.999), "eps": 1e-8,
                                                         "weight_decay": 5e-4, "amsgrad": False,
                                                         "initial_lr": 3.5e-4, "params": [0, 1]}]},
            "scheduler": {"milestones": [40, 70], "gamma": 0.1, "warmup_factor": 0.01, "warmup_iters": 10,
                          "warmup_method": "linear", "base_lrs": [3.5e-4], "last_epoch": 120, "_step_count": 121,
                          "_last_lr": [3.5e-6]},
            **({"config": config} if config is not None else {})}


def torchreid_config(node: type, **bpbreid: object) -> dict:
    """A BPBReID run's yacs config (default_config.py values, ``bpbreid`` overrides), built of ``node`` s."""
    settings = {"pooling": "gwap", "normalization": "identity", "dim_reduce": "after_pooling",
                "dim_reduce_output": 512, "backbone": "hrnet32", "learnable_attention_enabled": True,
                "test_embeddings": ["bn_foreg", "parts"], "test_use_target_segmentation": "none",
                "testing_binary_visibility_score": True, "shared_parts_id_classifier": False,
                "masks": {"preprocess": "five_v", "parts_num": 5, "dir": "pifpaf_maskrcnn_filtering"}, **bpbreid}
    return node({"model": {"name": "bpbreid", "load_weights": "", "bpbreid": settings},
                 "data": {"sources": ["market1501"], "height": 384, "width": 128, "norm_mean": [0.485, 0.456, 0.406]},
                 "train": {"stepsize": [40, 70], "lr": 0.00035}, "project": {"start_time": "2022_08_01_10_00_00"}})


class _CfgNode(dict):
    """yacs 0.1.8's ``CfgNode`` as it pickles: a dict (nested dicts become nodes) whose ``__dict__`` holds the four
    bookkeeping entries its ``__init__`` sets (yacs/config.py)."""

    def __init__(self, init_dict: dict | None = None) -> None:
        super().__init__({k: type(self)(v) if isinstance(v, dict) else v for k, v in (init_dict or {}).items()})
        self.__dict__.update({"__immutable__": False, "__deprecated_keys__": set(),
                              "__renamed_keys__": {}, "__new_allowed__": False})


class _YacsModule:
    """Installs a stand-in ``yacs.config.CfgNode`` (:class:`_CfgNode`) while active, so a checkpoint can pickle its
    config under the real global name, as torchreid's save_checkpoint does; loading then needs no yacs."""

    def __enter__(self):
        package, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        node = type("CfgNode", (_CfgNode,), {"__module__": "yacs.config", "__qualname__": "CfgNode"})
        config.CfgNode, package.config = node, config
        self.saved = {name: sys.modules.get(name) for name in ("yacs", "yacs.config")}
        sys.modules.update({"yacs": package, "yacs.config": config})
        return node

    def __exit__(self, *exc_info):
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


yacs_config = _YacsModule
