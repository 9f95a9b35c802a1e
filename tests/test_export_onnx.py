"""tools/export_onnx.py: the ONNX graph (dynamic batch) gives the PyTorch features (onnxruntime)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _inference_models import REPO, demo_config, save_backbone_export, tiny_pass_vit, untrained_final_model
from _tool_loading import load_tool_module
from passreid.inference import load_model

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tool():
    return load_tool_module(REPO / "tools" / "export_onnx.py", "export_onnx_tool")


def _run_onnx(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {node.name: value.numpy() for node, value in zip(session.get_inputs(), inputs)}
    return session.run(["features"], feeds)[0]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("overrides", [[], ["model.sie_camera=true", "model.jpm=true"]], ids=["pass_head", "sie_jpm"])
def test_onnx_matches_pytorch_for_a_finetuned_model(tool, tmp_path, synthetic_world, overrides, exporter):
    cfg = demo_config(tmp_path / "run", synthetic_world, *overrides)
    weights = untrained_final_model(tmp_path / "model_final.pth", cfg, num_cameras=4 if overrides else 0)
    out = tmp_path / "reid.onnx"
    assert tool.main(["--weights", str(weights), "--out", str(out), "--exporter", exporter]) == 0
    model = load_model(weights, device="cpu")
    for batch in (1, 5):  # neither is the traced batch size (2): the batch axis is dynamic
        images = torch.randn(batch, 3, 128, 64, generator=torch.Generator().manual_seed(batch))
        inputs = (images, torch.arange(batch) % 4) if model.uses_cameras else (images,)
        with torch.no_grad():
            expected = model.net(*inputs).numpy()
        np.testing.assert_allclose(_run_onnx(out, *inputs), expected, atol=1e-4, rtol=0)
    metadata = json.loads(out.with_suffix(".onnx.json").read_text())
    assert metadata["input_names"] == (["images", "camids"] if overrides else ["images"])
    assert metadata["feature_dim"] == expected.shape[1] and metadata["input_height"] == 128
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["pixel_mean"] == [0.5, 0.5, 0.5]
    # Only the two files are left beside them: the exporter's scratch folder and the temp files are gone.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "reid"))) == \
        ["reid.onnx", "reid.onnx.json"]


def test_onnx_matches_pytorch_for_a_backbone_export(tool, tmp_path):
    vit = tiny_pass_vit()
    weights = save_backbone_export(tmp_path / "backbone_final.pth", vit)
    out = tmp_path / "backbone.onnx"
    assert tool.main(["--weights", str(weights), "--out", str(out)]) == 0
    images = torch.randn(3, 3, 128, 64)
    with torch.no_grad():
        tokens = vit(images)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1).numpy()
    np.testing.assert_allclose(_run_onnx(out, images), expected, atol=1e-4, rtol=0)


def test_check_fails_when_the_outputs_differ(tool, tmp_path):
    weights = save_backbone_export(tmp_path / "backbone.pth", tiny_pass_vit())
    model = load_model(weights, device="cpu")
    out = tmp_path / "b.onnx"
    tool.export_onnx(model, out)
    assert tool.check_onnx(model, out, atol=1e-4) < 1e-4
    with torch.no_grad():
        model.backbone.norm.bias.add_(1.0)  # the PyTorch model changes after export
    with pytest.raises(tool.OnnxCheckError, match="differs from PyTorch"):
        tool.check_onnx(model, out, atol=1e-4)


def test_export_fails_clearly(tool, tmp_path, capsys):
    assert tool.main(["--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    np.savez(tmp_path / "feats.npz", feats=np.zeros((2, 3), np.float32))
    assert tool.main(["--weights", str(tmp_path / "feats.npz"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert (f"{tmp_path / 'feats.npz'} is a zip archive but not a torch.save checkpoint (no data.pkl; it holds "
            "feats.npy); expected a PyTorch checkpoint written by torch.save") in capsys.readouterr().err


def test_an_opset_without_the_models_ops_is_one_clear_error(tool, tmp_path, capsys):
    weights = save_backbone_export(tmp_path / "backbone.pth", tiny_pass_vit())
    assert tool.main(["--weights", str(weights), "--out", str(tmp_path / "b.onnx"), "--opset", "7"]) == 2
    err = capsys.readouterr().err
    assert "error: ONNX export failed" in err and "opset 7" in err and "Traceback" not in err
