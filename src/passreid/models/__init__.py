"""Models: the one PASS/DINO/TransReID-style Vision Transformer and backbone checkpoint loading."""
from passreid.models.checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    LoadReport,
    export_backbone,
    extract_backbone_state_dict,
    infer_pretrain_grid,
    load_pretrained,
    read_checkpoint,
    resize_pos_embed,
)
from passreid.models.vit import (
    VIT_ARCHS,
    OverlapPatchEmbed,
    VisionTransformer,
    ViTArch,
    build_vit,
    interpolate_pos_grid,
    list_vit_archs,
    patch_grid_size,
)

__all__ = [
    "VIT_ARCHS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "LoadReport",
    "OverlapPatchEmbed",
    "ViTArch",
    "VisionTransformer",
    "build_vit",
    "export_backbone",
    "extract_backbone_state_dict",
    "infer_pretrain_grid",
    "interpolate_pos_grid",
    "list_vit_archs",
    "load_pretrained",
    "patch_grid_size",
    "read_checkpoint",
    "resize_pos_embed",
]
