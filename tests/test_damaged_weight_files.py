"""Weight files that are not what they should be: text renamed .pth, truncated, empty, a lone tensor, unrelated
tensors, wrong shapes. Every place that reads a user's weights file (``model.pretrained``, ``finetune/test.py
--weights`` with and without ``--config-file``, ``tools/extract_features.py``, ``tools/convert_checkpoint.py``)
answers with one error that names the file and says what was expected, never a bare torch/pickle error."""
from __future__ import annotations

import dataclasses
import re
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from _inference_models import (REPO, demo_config, restored_passreid_logging, save_backbone_export, tiny_pass_vit,
                               untrained_final_model)
from _tool_loading import load_tool_module
from passreid.finetune import build_model
from passreid.finetune.checkpoints import stored_config
from passreid.finetune.testing import run_test
from passreid.models import CheckpointFormatError, CheckpointMismatchError, read_checkpoint

TORCH_SAVE = r"expected a PyTorch checkpoint written by torch\.save \(a zip archive\)"
NOT_A_CHECKPOINT = {
    "text": r"is not a PyTorch checkpoint: it starts with the text '<!DOCTYPE html>' .*" + TORCH_SAVE,
    "truncated": r"is a damaged or truncated zip archive \(\d+ bytes; .*\).*" + TORCH_SAVE,
    "empty": r"is empty \(0 bytes\); " + TORCH_SAVE,
    "tensor": r"holds a Tensor, not a checkpoint dict; expected ",
}
# What each reader expects of a file of unrelated tensors, and how it names a tensor of the wrong shape.
WRONG_CONTENT = {
    "model.pretrained": {"random_tensors": r"holds none of the \d+ backbone tensors of the model \(it holds bias, "
                                           r"weight\); expected a ViT backbone",
                         "wrong_shape": r"shape mismatch norm\.weight: checkpoint \[7\] vs model \[192\]"},
    "test.py --config-file": {"random_tensors": r"is not a fine-tuned model passreid recognises \(it holds bias, "
                                                r"weight\); expected a passreid model_final\.pth",
                              "wrong_shape": r"backbone\.norm\.weight: file \[7\] vs model \[192\]"},
    # Without --config-file, test.py reads the stored config first (shapes are then checked as with --config-file).
    "test.py (stored config)": {"random_tensors": r"stores no passreid fine-tuning config .*pass --config-file"},
    "extract_features.py": {"random_tensors": r"is not a model file passreid recognises \(top-level keys: bias, "
                                              r"weight\); expected one of",
                            "wrong_shape": r"backbone\.norm\.weight: file \[7\] vs model \[192\]"},
    "convert_checkpoint.py": {"random_tensors": r"the extracted backbone has no cls_token / patch_embed\.proj\.weight "
                                                r"/ pos_embed.*is this a ViT checkpoint\?",
                              "wrong_shape": r"shape mismatch norm\.weight: checkpoint \[7\] vs model \[192\]"},
}
CASES = [(entry, kind) for entry, wrong in WRONG_CONTENT.items() for kind in (*NOT_A_CHECKPOINT, *wrong)]


@pytest.fixture(autouse=True)
def passreid_logging_restored():
    with restored_passreid_logging():
        yield


@pytest.fixture(scope="module")
def world_cfg(tmp_path_factory, synthetic_world):
    return demo_config(tmp_path_factory.mktemp("damaged") / "run", synthetic_world)


@pytest.fixture(scope="module")
def files(tmp_path_factory, world_cfg) -> dict[str, dict[str, Path]]:
    """Bad files; ``wrong_shape`` is a backbone export for the backbone readers and a model_final.pth for the
    fine-tuned-model readers (norm.weight of 7 values instead of 192)."""
    root = tmp_path_factory.mktemp("bad_files")
    final = untrained_final_model(root / "model_final.pth", world_cfg)
    export = save_backbone_export(root / "backbone.pth", tiny_pass_vit())
    (root / "text.pth").write_text("<!DOCTYPE html>\n<html><body>Sign in to download</body></html>\n")
    data = final.read_bytes()
    (root / "truncated.pth").write_bytes(data[: len(data) // 2])
    (root / "empty.pth").write_bytes(b"")
    torch.save(torch.randn(8, 8), root / "tensor.pth")
    torch.save({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, root / "random_tensors.pth")
    shape_export = torch.load(export, weights_only=True)
    shape_export["backbone"]["norm.weight"] = torch.randn(7)
    torch.save(shape_export, root / "wrong_shape_export.pth")
    shape_final = torch.load(final, weights_only=True)
    shape_final["model"]["backbone.norm.weight"] = torch.randn(7)
    torch.save(shape_final, root / "wrong_shape_final.pth")
    common = {kind: root / f"{kind}.pth" for kind in (*NOT_A_CHECKPOINT, "random_tensors")}
    return {"backbone": {**common, "wrong_shape": root / "wrong_shape_export.pth"},
            "finetuned": {**common, "wrong_shape": root / "wrong_shape_final.pth"}}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "0001_c1s1_000001_00.jpg"
    Image.new("RGB", (64, 128), (120, 80, 40)).save(path)
    return path


def _tool(name: str):
    return load_tool_module(REPO / "tools" / f"{name}.py", f"{name}_damaged_test")


def _error_of(call) -> str:
    with pytest.raises((CheckpointFormatError, CheckpointMismatchError)) as caught:
        call()
    return str(caught.value)


def _cli_error(tool: str, argv: list[str], capsys) -> str:
    assert _tool(tool).main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def _message(entry: str, path: Path, world_cfg, tmp_path: Path, image: Path, capsys) -> str:
    if entry == "model.pretrained":
        cfg = dataclasses.replace(world_cfg, model=dataclasses.replace(world_cfg.model, pretrained=str(path)))
        return _error_of(lambda: build_model(cfg, 5, 0))
    if entry == "test.py --config-file":
        return _error_of(lambda: run_test(path, world_cfg, tmp_path / "test"))
    if entry == "test.py (stored config)":
        return _error_of(lambda: stored_config(path))
    if entry == "extract_features.py":
        return _cli_error("extract_features", ["--weights", str(path), "--images", str(image),
                                               "--out", str(tmp_path / "f.npz"), "--device", "cpu"], capsys)
    return _cli_error("convert_checkpoint", [str(path), str(tmp_path / "backbone.pth")], capsys)


@pytest.mark.parametrize("entry,kind", CASES)
def test_every_reader_names_the_file_and_what_it_expected(entry, kind, files, world_cfg, tmp_path, image, capsys):
    expected = NOT_A_CHECKPOINT.get(kind) or WRONG_CONTENT[entry][kind]
    group = "backbone" if entry in ("model.pretrained", "convert_checkpoint.py") else "finetuned"
    path = files[group][kind]
    message = _message(entry, path, world_cfg, tmp_path, image, capsys)
    assert str(path) in message
    assert re.search(expected, message, re.S), message
    assert "<in-memory checkpoint>" not in message and "KeyError" not in message


def test_read_checkpoint_reports_a_damaged_archive_and_a_foreign_zip(tmp_path):
    torch.save({"weight": torch.randn(64, 64)}, tmp_path / "good.pth")
    data = bytearray((tmp_path / "good.pth").read_bytes())
    pickle_start = data.index(b"\x80\x02")  # the pickle of the dict, stored uncompressed in the archive
    data[pickle_start + 2:pickle_start + 12] = b"\xff" * 10
    (tmp_path / "damaged.pth").write_bytes(bytes(data))
    message = _error_of(lambda: read_checkpoint(tmp_path / "damaged.pth"))
    assert re.search(r"damaged\.pth cannot be read as a PyTorch checkpoint written by torch\.save.*"
                     r"probably damaged or incompletely copied", message)
    assert "Weights only load failed" not in message  # torch's preamble is cut to the reason
    with zipfile.ZipFile(tmp_path / "notes.pth", "w") as archive:
        archive.writestr("notes.txt", "not a model")
    assert re.search(r"notes\.pth is a zip archive but not a torch\.save checkpoint \(no data\.pkl; it holds "
                     r"notes\.txt\)", _error_of(lambda: read_checkpoint(tmp_path / "notes.pth")))
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 71)))
    assert "it starts with the bytes 07 08 09 0a" in _error_of(lambda: read_checkpoint(tmp_path / "noise.pth"))
