"""A small writer of ONNX graphs on top of the ``onnx`` package's helpers.

Weights never sit in the ModelProto: each initializer's bytes go straight to the one
external-data file as it is added (aligned to 64 bytes), and the proto only records where they
are. So a GLM-130B export needs no second in-memory copy of its weights and the model file stays
far below protobuf's 2 GB limit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

# torch dtype -> ONNX element type
ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64,
              torch.int32: TensorProto.INT32, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
              torch.bool: TensorProto.BOOL}
ALIGN = 64


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 2 bytes, as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class OnnxBuilder:
    """Nodes, value names and initializers of one ONNX graph being written."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "wb")
        self._offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    # ------------------------------------------------------------------ names
    def fresh(self, hint: str) -> str:
        """A value name not used yet, derived from ``hint``."""
        name, i = hint, 1
        while name in self._names:
            name, i = f"{hint}_{i}", i + 1
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"ONNX value name {name!r} is used twice")
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ graph pieces
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.reserve(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, *, outputs: list[str] | None = None,
           n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        """Add a node; returns its output name (or names when it has several)."""
        if outputs is None:
            base = hint or op_type
            outputs = [self.fresh(base if n_out == 1 else f"{base}.{k}") for k in range(n_out)]
        else:
            outputs = [o if o == "" else (o if o in self._names else self.reserve(o)) for o in outputs]
        name = self.fresh(f"node.{hint or op_type}")
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shape vectors, scalars), stored inline and shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh(f"const.{'x'.join(map(str, arr.shape)) or 'scalar'}")
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, tensor: torch.Tensor, elem_type: int | None = None,
               dims: list[int] | None = None) -> str:
        """An initializer whose bytes go to the external-data file. ``elem_type``/``dims`` override
        the tensor's own (for packed INT4: bytes of a uint8 tensor, ONNX type INT4, logical dims)."""
        name = self.reserve(name)
        raw = _raw_bytes(tensor)
        proto = TensorProto()
        proto.name = name
        proto.data_type = ONNX_DTYPE[tensor.dtype] if elem_type is None else elem_type
        proto.dims.extend(list(tensor.shape) if dims is None else list(dims))
        pad = (-self._offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(raw)
        for key, value in (("location", self.data_path.name), ("offset", str(self._offset)),
                           ("length", str(len(raw)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        proto.data_location = TensorProto.EXTERNAL
        self._offset += len(raw)
        self.initializers.append(proto)
        return name

    # ------------------------------------------------------------------ writing
    def close_data(self) -> int:
        if not self._data.closed:
            self._data.close()
        return self._offset

    def model(self, name: str, opsets: dict[str, int], doc: str) -> onnx.ModelProto:
        self.close_data()
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=self.initializers,
                                  doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                  producer_name="glmrt", ir_version=10)
        return model
