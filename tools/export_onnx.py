"""Export a trained model's test-feature function to ONNX (dynamic batch axis), checked with onnxruntime.

    python tools/export_onnx.py --weights runs/market/model_final.pth --out reid.onnx
    python tools/export_onnx.py --weights backbone_final.pth --out pass_backbone.onnx --backbone-feature cls

The graph maps ``images`` (B x 3 x H x W, float32, already resized to the model's input size and normalised
with its mean/std) to ``features`` (B x D) -- exactly what ``passreid.FeatureExtractor`` computes after its
transform. SIE models take a second input ``camids`` (B, int64, 0-based training cameras). The input size,
mean, std, feature width and source are written into the ONNX metadata and into ``<out>.json``.

Unless ``--no-check``, the exported file is run with onnxruntime on a random batch of a size other than the
one traced (so the dynamic batch axis is exercised) and compared with the PyTorch output; a difference above
``--atol`` is an error. Exit status 2 on bad input or a failed check.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from passreid.atomic_files import atomic_write, atomic_write_text
from passreid.cli import error_boundary
from passreid.config import add_debug_flag
from passreid.inference import BACKBONE_FEATURES, CLI_ERRORS, LoadedModel, load_model

TRACE_BATCH = 2
CHECK_BATCH = 3


class OnnxCheckError(ValueError):
    """The ONNX output differs from the PyTorch output by more than the tolerance."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="any weights file passreid.load_model reads")
    parser.add_argument("--config-file", default=None, help="config of a published TransReID/PASS checkpoint")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--backbone-feature", choices=BACKBONE_FEATURES, default="pass_fusion")
    parser.add_argument("--out", type=Path, required=True, help=".onnx file to write")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch.onnx exporter: the TorchScript one (default; deprecated by PyTorch >= 2.9, "
                             "twice as fast here) or the torch.export-based one (opset >= 18)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime comparison")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnx - torch| (default 1e-4)")
    add_debug_flag(parser)
    return parser


def _example_inputs(model: LoadedModel, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *model.img_size, generator=generator)
    if not model.uses_cameras:
        return (images,)
    num_cameras = int(model.network.num_cameras)
    return images, torch.randint(0, num_cameras, (batch,), generator=generator)


def export_onnx(model: LoadedModel, out: Path, opset: int = 17, exporter: str = "torchscript") -> dict:
    """Write ``out`` (and ``<out>.json``), each atomically; returns the metadata recorded with it."""
    # The exporter writes to a path: a scratch folder beside --out (the space the user chose, not /tmp).
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.export-", dir=out.parent) as scratch:
        graph_file = Path(scratch) / "model.onnx"
        metadata = _export_graph(model, graph_file, opset, exporter)
        _write_metadata(graph_file, out, metadata)
    atomic_write_text(out.with_suffix(out.suffix + ".json"), json.dumps(metadata, indent=2) + "\n")
    return metadata


def _export_graph(model: LoadedModel, out: Path, opset: int, exporter: str) -> dict:
    """Export the feature network to ``out``; returns the metadata that describes its inputs and output."""
    model.to("cpu")
    net = model.net.eval()
    inputs = _example_inputs(model, TRACE_BATCH, seed=0)
    names = ["images", "camids"][: len(inputs)]
    with torch.no_grad():
        feature_dim = int(net(*inputs).shape[1])
    if exporter == "torchscript":
        axes = {name: {0: "batch"} for name in [*names, "features"]}
        with warnings.catch_warnings():
            # The shape checks it warns about depend on H and W only, which the graph fixes; the batch stays dynamic.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(net, inputs, str(out), input_names=names, output_names=["features"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    else:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(net, inputs, str(out), input_names=names, output_names=["features"],
                          dynamic_shapes=tuple({0: batch} for _ in inputs), opset_version=max(opset, 18), dynamo=True)
    metadata = {"source": model.source, "kind": model.kind, "description": model.describe(),
                "input_names": names, "output_name": "features", "input_height": model.img_size[0],
                "input_width": model.img_size[1], "pixel_mean": list(model.pixel_mean),
                "pixel_std": list(model.pixel_std), "feature_dim": feature_dim,
                "preprocessing": "RGB, resize (bilinear) to input_height x input_width, scale to [0, 1], "
                                 "subtract pixel_mean, divide by pixel_std"}
    return metadata


def _write_metadata(exported: Path, out: Path, metadata: dict) -> None:
    """``out``: the ``exported`` graph with ``metadata`` in its properties."""
    import onnx

    graph = onnx.load(str(exported))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    atomic_write(out, lambda handle: handle.write(graph.SerializeToString()), what="ONNX file")


def check_onnx(model: LoadedModel, path: Path, atol: float) -> float:
    """Max |onnxruntime - PyTorch| on a random batch of another size than the traced one."""
    try:
        import onnxruntime
    except ImportError as error:
        raise OnnxCheckError("onnxruntime is not installed (pip install onnxruntime, or pass --no-check)") from error
    inputs = _example_inputs(model, CHECK_BATCH, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {node.name: tensor.numpy() for node, tensor in zip(session.get_inputs(), inputs)}
    (onnx_out,) = session.run(["features"], feeds)
    with torch.no_grad():
        torch_out = model.net.to("cpu").eval()(*inputs).numpy()
    if onnx_out.shape != torch_out.shape:
        raise OnnxCheckError(f"ONNX output shape {onnx_out.shape} differs from PyTorch's {torch_out.shape}")
    difference = float(np.abs(onnx_out - torch_out).max())
    if not difference <= atol:
        raise OnnxCheckError(f"ONNX output differs from PyTorch by {difference:.3g} > --atol {atol:g}")
    return difference


@error_boundary(extra=(*CLI_ERRORS, torch.onnx.OnnxExporterError))  # e.g. an --opset without an op the model uses
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"output folder {args.out.parent} does not exist")
    model = load_model(args.weights, args.config_file, which=args.which, backbone_feature=args.backbone_feature,
                       device="cpu")
    print(model.describe())
    metadata = export_onnx(model, args.out, args.opset, args.exporter)
    message = (f"wrote {args.out} (+ .json): {metadata['input_names']} -> features "
               f"(batch x {metadata['feature_dim']})")
    if args.check:
        difference = check_onnx(model, args.out, args.atol)
        message += f"; onnxruntime matches PyTorch on a batch of {CHECK_BATCH} (max |diff| {difference:.2e})"
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
