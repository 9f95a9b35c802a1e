"""passreid fine-tuned models rewritten in the key layouts of the released code, for the loading tests.

Each function returns the ``model.state_dict()`` the released training code would save for the same weights
(DPM model/make_model.py + model/backbones/vit_pytorch.py, TSD model/tsd.py + model/neck/*, DPEFormer
model/make_model_zx.py + model/backbones/vit_pytorch.py), including the modules their forward never uses
(filled with noise, so loading them anywhere would show), and a torchreid BPBReID checkpoint (bpbreid
torchreid/models/bpbreid.py, torchreid/utils/torchtools.py). The renames are written out here from the
released module names, independently of passreid's mapping rules.
"""
from __future__ import annotations

import sys
import types

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


def bpbreid_released_checkpoint(num_classes: int = 7) -> dict:
    """A torchreid save_checkpoint dict of BPBReID with an HRNet-W32 backbone (shrunken tensors, real names)."""
    hrnet = "backbone_appearance_feature_extractor."
    state = {hrnet + "conv1.weight": _noise(64, 3, 3, 3), hrnet + "bn1.weight": _noise(64),
             hrnet + "transition1.0.0.weight": _noise(32, 256, 3, 3),
             hrnet + "stage4.0.branches.0.0.conv1.weight": _noise(32, 32, 3, 3),
             "pixel_classifier.bn.weight": _noise(32), "pixel_classifier.classifier.weight": _noise(6, 32, 1, 1),
             "global_identity_classifier.bn.weight": _noise(32),
             "global_identity_classifier.classifier.weight": _noise(num_classes, 32),
             "parts_identity_classifier.0.classifier.weight": _noise(num_classes, 32)}
    return {"state_dict": state, "epoch": 120, "rank1": 0.9, "mAP": 0.8}


class _YacsModule:
    """Installs a stand-in ``yacs.config.CfgNode`` (a dict subclass, as in yacs) while active, so a checkpoint can
    pickle its config under the real global name, as torchreid's save_checkpoint does."""

    def __enter__(self):
        package, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        node = type("CfgNode", (dict,), {"__module__": "yacs.config"})
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
