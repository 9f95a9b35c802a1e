"""tools/convert_checkpoint.py: published PASS checkpoints and passreid checkpoints -> backbone export."""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _inference_models import published_optimizer_state, save_as_published
from _released_checkpoints import bpbreid_released_checkpoint, dpm_released_state, torchreid_config, yacs_config
from _tool_loading import load_tool_module
from passreid.config import load_config
from passreid.finetune import FinetuneConfig, build_model
from passreid.models import build_vit, load_pretrained, read_checkpoint
from passreid.pretrain import PASSMetaArch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"
# Published 256x128 layout (pos_embed (1, 128, D)) with narrow heads to keep the test light.
META_KWARGS = dict(out_dim=64, hidden_dim=64, bottleneck_dim=16)


def load_tool():
    return load_tool_module(TOOL, "convert_checkpoint_tool")


@pytest.fixture(scope="module")
def tool():
    return load_tool()


@pytest.fixture(scope="module")
def meta() -> PASSMetaArch:
    """A meta-architecture whose student and teacher differ (as after training)."""
    torch.manual_seed(0)
    model = PASSMetaArch("vit_tiny", **META_KWARGS)
    with torch.no_grad():
        for param in model.student.parameters():
            param.add_(0.01 * torch.randn_like(param))
        for center in model.loss.centers():
            center.normal_()
    return model


def published_checkpoint(meta: PASSMetaArch) -> dict:
    """The published PASS-reID PASS/main_pass.py save_dict, built by hand from the meta-arch; the optimizer's
    param groups hold numpy.float64 lr / weight decay as there (save it with ``save_as_published``)."""
    student = {f"module.{k}": v.clone() for k, v in meta.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in meta.teacher.state_dict().items()}
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": published_optimizer_state(meta.student),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, height=256, width=128, out_dim=64,
                                   local_crops_number=9, epochs=100),
        "dino_loss": {f"center_{n}": c.clone() for n, c in zip(meta.loss.token_names, meta.loss.centers())},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 0},
    }


def assert_same_backbone(export_path: Path, reference: torch.nn.Module) -> None:
    fresh = build_vit("vit_tiny", pass_interp_quirk=True)
    report = load_pretrained(fresh, str(export_path))
    assert report.is_exact and not report.missing and not report.unexpected and not report.resized
    expected = reference.state_dict()
    assert fresh.state_dict().keys() == expected.keys()
    assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected)
    images = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(0))
    reference.eval()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), reference(images))
        assert torch.equal(fresh(images[:, :, :128, :64], part_index=1), reference(images[:, :, :128, :64], part_index=1))


def test_published_checkpoint_teacher(tool, meta, tmp_path, capsys):
    source = tmp_path / "checkpoint.pth"
    save_as_published(published_checkpoint(meta), source)
    out = tmp_path / "backbone.pth"
    assert tool.main([str(source), str(out)]) == 0
    printed = capsys.readouterr().out
    for entry in ("teacher.head.mlp_cls.0.weight", "teacher.head.last_layer_pt3.weight_g",
                  "student/module.backbone.cls_token", "optimizer/*", "dino_loss/center_pt1",
                  "fp16_scaler/*", "epoch (int)", "args (Namespace)"):
        assert f"dropped: {entry}\n" in printed
    assert "part_tokens=3" in printed and "img_size=[256, 128]" in printed
    export = torch.load(out, weights_only=True)
    assert export["arch"] == "vit_tiny" and export["img_size"] == [256, 128] and export["num_part_tokens"] == 3
    assert export["which"] == "teacher" and export["epoch"] == 100
    assert {"part_token1", "part3_pos", "cls_pos", "pos_embed"} <= set(export["backbone"])
    assert_same_backbone(out, meta.teacher_backbone())


def test_published_checkpoint_student_without_args(tool, meta, tmp_path):
    checkpoint = published_checkpoint(meta)
    del checkpoint["args"]  # size, patch and arch are then inferred from the weights
    source = tmp_path / "checkpoint.pth"
    save_as_published(checkpoint, source)
    out = tmp_path / "student.pth"
    assert tool.main([str(source), str(out), "--which", "student"]) == 0
    assert_same_backbone(out, meta.student["backbone"])
    teacher_out = tmp_path / "teacher.pth"
    assert tool.main([str(source), str(teacher_out)]) == 0
    student_sd = torch.load(out, weights_only=True)["backbone"]
    teacher_sd = torch.load(teacher_out, weights_only=True)["backbone"]
    assert not torch.equal(student_sd["part_token1"], teacher_sd["part_token1"])


def test_passreid_training_checkpoint(tool, meta, tmp_path, capsys):
    """Our own checkpoint.pth: {"model": PASSMetaArch.state_dict(), "optimizer", "config", ...}."""
    from passreid.engine import build_checkpoint

    state = build_checkpoint(epoch=3, iteration=30, config={"model": {"arch": "vit_tiny", "img_size": [256, 128]}})
    state["model"] = meta.state_dict()
    assert any(k.startswith("student.backbone.") for k in state["model"])
    source = tmp_path / "checkpoint.pth"
    torch.save(state, source)
    out = tmp_path / "backbone.pth"
    assert tool.main([str(source), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: model: passreid PASSMetaArch state dict" in printed
    assert "dropped: dino_loss/center_cls\n" in printed and "dropped: teacher.head.mlp_pt1.0.weight\n" in printed
    assert_same_backbone(out, meta.teacher_backbone())


def test_passreid_checkpoint_with_published_aliases(tool, meta, tmp_path):
    from passreid.pretrain import to_published_layout

    state = {"model": meta.state_dict(), "epoch": 2}
    state.update(to_published_layout(state["model"]))
    source = tmp_path / "checkpoint.pth"
    torch.save(state, source)
    out = tmp_path / "backbone.pth"
    assert tool.main([str(source), str(out)]) == 0
    assert_same_backbone(out, meta.teacher_backbone())


def test_wrong_arch_and_missing_file_are_clear_errors(tool, meta, tmp_path, capsys):
    source = tmp_path / "checkpoint.pth"
    save_as_published(published_checkpoint(meta), source)
    assert tool.main([str(source), str(tmp_path / "x.pth"), "--arch", "vit_small"]) == 2
    assert "arch 'vit_small' has embed_dim 384" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "nope.pth"), str(tmp_path / "x.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_published_checkpoint_with_numpy_schedule_values_loads(tool, meta, tmp_path):
    """PASS's checkpoint.pth holds numpy.float64 lr / weight decay in the optimizer's param groups, pickled under
    numpy 1.x names; the safe loader allows exactly those, so the tool and model.pretrained both read it."""
    source = save_as_published(published_checkpoint(meta), tmp_path / "checkpoint.pth")
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is not None:
        assert {"numpy.core.multiarray.scalar", "numpy.dtype"} <= set(lister(str(source)))
    with pytest.raises(pickle.UnpicklingError):  # what refused the file before
        torch.load(source, weights_only=True)
    groups = read_checkpoint(source)["optimizer"]["param_groups"]
    assert isinstance(groups[0]["lr"], np.float64) and isinstance(groups[0]["weight_decay"], np.float64)
    assert groups[1]["weight_decay"] == 0.0 and 0.0 < groups[0]["lr"] <= 5e-4
    assert tool.main([str(source), str(tmp_path / "backbone.pth")]) == 0
    assert_same_backbone(tmp_path / "backbone.pth", meta.teacher_backbone())
    cfg = load_config(FinetuneConfig, None, ["model.arch=vit_tiny", "model.img_size=[256,128]",
                                             f"model.pretrained={source}"])
    model = build_model(cfg, 5, 0)  # model.pretrained=<published checkpoint.pth>
    teacher = meta.teacher_backbone().state_dict()
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in teacher.items())


def test_released_finetuned_checkpoints_are_named_with_what_loads_them(tool, tmp_path, capsys, monkeypatch):
    dpm_cfg = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "demo_dpm.yaml")
    torch.save(dpm_released_state(build_model(dpm_cfg, 7, 0, load_weights=False)), tmp_path / "dpm.pth")
    assert tool.main([str(tmp_path / "dpm.pth"), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'dpm.pth'} is a released DPM checkpoint" in err
    assert "not a pre-training checkpoint" in err and "finetune/test.py --weights" in err and "dpm_vit_b_256" in err

    # torchreid pickles its yacs config: read without yacs (as an OrderedDict), and the layout is named with what
    # loads it. The tool reads only the layout, so the demo's ViT stands in for the HRNet under torchreid's names.
    bpbreid = build_model(load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "demo_bpbreid.yaml"), 7, 0,
                          load_weights=False)
    with yacs_config() as node:
        torch.save(bpbreid_released_checkpoint(bpbreid, torchreid_config(node)), tmp_path / "bpbreid.pth")
    assert tool.main([str(tmp_path / "bpbreid.pth"), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bpbreid.pth'} is a released BPBReID (torchreid) checkpoint" in err
    assert "finetune/test.py --weights" in err and "bpbreid_hrnet32_384.yaml" in err
    # Trusting its pickles needs yacs's code: without it, one error naming the file and the import that failed.
    monkeypatch.setitem(sys.modules, "yacs", None)
    assert tool.main([str(tmp_path / "bpbreid.pth"), str(tmp_path / "x.pth"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bpbreid.pth'} pickles an object whose code cannot be imported here (ModuleNotFoundError: " in err
    assert "No module named 'yacs.config'" in err
    assert not (tmp_path / "x.pth").exists()
