"""Writing the ONNX graph: the TorchScript export, shared atom weights, fp16 weights, metadata,
external data above protobuf's limit, onnx.checker."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import first_line
from ..inputs import fresh, input_tensors
from .base import ExportError, _import_onnx, dynamic_axis_positions, input_names
from .results import GraphStats

#: Protobuf's hard limit; above it (less a margin for the graph itself) weights go to an external file.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_MARGIN = 64 * 2**20


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _torch_export(
    model: nn.Module,
    example: Tensor | Sequence[Tensor],
    path: Path | BinaryIO,
    opset: int,
    dynamic: Sequence[str],
    n_outputs: int,
    *,
    what: str = "the model",
    hint: str = "try another --opset or --mode; set STJFD_DEBUG=1 for details",
    layout: str = "BCTHW",
) -> None:
    """Trace ``model`` on ``example`` into ``path`` (a file, or an in-memory buffer) with the options
    every stjfd graph is written with; a failure is one ExportError naming ``what`` failed. ``dynamic`` names
    axes of an input in ``layout`` (``BTHWC``: time is axis 1)."""
    outputs = _output_names(n_outputs)
    names = input_names(len(input_tensors(example)))
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        positions = dynamic_axis_positions(layout)
        for index, input_name in enumerate(names):
            suffix = "" if len(names) == 1 else f"_{index}"  # pathways may differ in length: one axis name each
            axes[input_name] = {positions[name]: name if name == "batch" else name + suffix for name in dynamic}
        if "batch" in dynamic:
            for name in outputs:
                axes[name] = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter's deprecation notice and tracer warnings are not the user's concern.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (fresh(example),),
                str(path) if isinstance(path, Path) else path,
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_axes=axes or None,
                do_constant_folding=True,  # the clean graph: Conv+BatchNorm fused, no shape arithmetic
                export_params=True,
            )
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ExportError(f"torch.onnx could not export {what} at opset {opset}: {first_line(exc)[:300]}", hint) from None


def _to_fp16_weights(onnx: Any, proto: Any) -> int:
    """Store float initializers as float16, each followed by a Cast back to float; returns the count."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts = []
    converted = 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        name = init.name
        half = numpy_helper.from_array(array.astype(np.float16), name=f"{name}__fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}__cast"))
        converted += 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return converted


def _share_tiled_weights(proto: Any) -> int:
    """Store each grouped Conv weight made of identical per-group blocks once, expanded in the graph.

    Torch's constant folding turns the expanded atoms of the depthwise atom convs into constants
    ``groups`` times their size. A weight ``W [G·m, k, …]`` whose G blocks ``[m, k, …]`` are exactly
    equal becomes ``Reshape(Expand(block[None], [G, m, k, …]), W.shape)`` over the stored block;
    onnxruntime folds it back once when it loads the graph. Returns the number of weights shared.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    # The exporter deduplicates equal initializers and feeds the copies through Identity nodes.
    identity_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    new_nodes, new_inits, drop = [], [], set()
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        name = node.input[1]
        while name in identity_of:
            name = identity_of[name]
        if name not in initializers or name in drop:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = numpy_helper.to_array(initializers[name])
        if groups <= 1 or weight.shape[0] % groups:
            continue
        blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        if not np.array_equal(blocks, np.broadcast_to(blocks[:1], blocks.shape)):
            continue
        shared = numpy_helper.from_array(np.ascontiguousarray(blocks[:1]), name=f"{name}__shared")
        expand_to = numpy_helper.from_array(np.array(blocks.shape, dtype=np.int64), name=f"{name}__expand_shape")
        flat = numpy_helper.from_array(np.array(weight.shape, dtype=np.int64), name=f"{name}__shape")
        new_inits += [shared, expand_to, flat]
        new_nodes += [
            helper.make_node("Expand", [shared.name, expand_to.name], [f"{name}__expanded"], name=f"{name}__expand"),
            helper.make_node("Reshape", [f"{name}__expanded", flat.name], [name], name=f"{name}__reshape"),
        ]
        drop.add(name)
    if not drop:
        return 0
    kept = [init for init in graph.initializer if init.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # inputs are initializers only, so first is a valid order
    return len(drop)


def _set_metadata(proto: Any, items: Mapping[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in items.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def _save(onnx: Any, proto: Any, path: Path) -> list[Path]:
    """Save ``proto`` at ``path``; weights go to ``<name>.data`` beside it only above protobuf's 2 GB limit."""
    data_name = f"{path.name}.data"
    if proto.ByteSize() > PROTOBUF_LIMIT - EXTERNAL_DATA_MARGIN:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        return [path, path.parent / data_name]
    onnx.save_model(proto, str(path))
    return [path]


def _graph_stats(onnx: Any, files: Sequence[Path]) -> GraphStats:
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    proto = onnx.load(str(files[0]), load_external_data=False)
    parameters = sum(int(np.prod(init.dims)) for init in proto.graph.initializer if init.data_type in floats)
    return GraphStats(sum(f.stat().st_size for f in files), [f.name for f in files], parameters)


def _write_graph(
    model: nn.Module,
    example: Tensor | Sequence[Tensor],
    path: Path,
    *,
    opset: int,
    dynamic: Sequence[str],
    n_outputs: int,
    fp16: bool,
    metadata: Mapping[str, str],
    layout: str = "BCTHW",
) -> tuple[list[Path], bool]:
    """Trace ``model`` into ``path`` (a staging location), post-process, run onnx.checker."""
    onnx = _import_onnx()
    # A folder of its own: above 2 GB the TorchScript exporter writes one external file per weight.
    raw_dir = path.parent / f"{path.name}.raw"
    raw_dir.mkdir()
    try:
        _torch_export(model, example, raw_dir / path.name, opset, dynamic, n_outputs, layout=layout)
        proto = onnx.load(str(raw_dir / path.name))
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    _share_tiled_weights(proto)
    if fp16:
        _to_fp16_weights(onnx, proto)
    _set_metadata(proto, metadata)
    proto.producer_name = "stjfd (torch.onnx TorchScript exporter)"
    proto.producer_version = __version__
    files = _save(onnx, proto, path)
    del proto
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, shape inference errors
        raise ExportError(f"onnx.checker rejected the exported graph: {first_line(exc)[:300]}", "report this with the command used") from None
    return files, len(files) > 1
