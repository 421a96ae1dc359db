"""ONNX graphs of the exported models, run by ONNX Runtime or any other ONNX backend.

GRU (``gru_graph``): built node by node with ``onnx.helper`` from ``LowRankGRU``'s buffers
(``strlowrank.export``), so the factors stay factors. Inputs x [B, T, I] and h0 [B, H]
(zeros for a fresh sequence; passing the last h back continues a stream), outputs
y [B, T, H] and h_T [B, H]. Two forms:

``"scan"``: the loop of the C++ export as an ONNX ``Scan`` over time. Outside the loop the
input projection of all T steps, gi = (x B_W^T) A_W^T + b_ih + [b_hr, b_hz, 0] (two MatMuls
when W is factored, one when dense); inside, per step

    gh = (h B_U^T) A_U^T                    (two MatMuls; one when U is dense)
    r, z = sigmoid(gi_rz + gh_rz),   n = tanh(gi_n + r (gh_n + b_hn)),   h' = n + z (h - n)

``"gru_op"``: ONNX's own ``GRU`` operator (``linear_before_reset=1``, torch's GRU) with the
dense W = A_W B_W and U = A_U B_U, gates reordered from torch's (r, z, n) to ONNX's (z, r, h).
This is what ``torch.onnx.export`` writes for ``nn.GRU``, the dense baseline deployers use.

CNN (``cnn_graph``): an unparametrized eval-mode CNN (thresholds baked, BN folded by
``strlowrank.export.export_onnx``) through torch's TorchScript-based ONNX exporter
(``dynamo=False``, which needs no onnxscript; torch marks it deprecated with a
DeprecationWarning, left visible). Sparse weights are stored dense with their zeros:
ONNX Runtime's CPU convolutions have no sparse kernels.

FastGRNN (``fastgrnn_graph``): the same ``Scan`` form for a FastGRNN layer, its one W and one U
kept as factors where that is smaller.

``ort_session`` opens a graph in ONNX Runtime at a fixed thread count. onnx and onnxruntime
are imported only here.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from strlowrank.method.lowrank import factored_is_cheaper

OPSET = 17
FORMS = ("scan", "gru_op")


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def _dense(at: torch.Tensor, bt: torch.Tensor, factored: bool) -> torch.Tensor:
    """W^T [in, out] from LowRankGRU's transposed buffers (w_at, w_bt)."""
    return bt @ at if factored else at


def gru_graph(gru: nn.Module, form: str = "scan", opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX graph of a ``LowRankGRU`` (or any module with its buffers: w_at, w_bt, u_at,
    u_bt, bias_ih, bias_hh, w_factored, u_factored, hidden_size); ``form`` in ``FORMS``."""
    if form not in FORMS:
        raise ValueError(f"gru_graph: form must be one of {FORMS}, got {form!r}")
    hid = int(gru.hidden_size)
    in_f = int(gru.w_bt.shape[0] if gru.w_factored else gru.w_at.shape[0])
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", in_f]),
        helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", hid]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", hid]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", hid]),
    ]
    nodes, inits = _gru_op_nodes(gru) if form == "gru_op" else _scan_nodes(gru)
    graph = helper.make_graph(nodes, f"strlowrank_gru_{form}", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="strlowrank"
    )
    onnx.checker.check_model(model)
    return model


def _init(name: str, value: torch.Tensor | np.ndarray) -> onnx.TensorProto:
    arr = value if isinstance(value, np.ndarray) else _array(value)
    return numpy_helper.from_array(arr, name)


def _buffers(gru: nn.Module) -> dict[str, torch.Tensor]:
    names = ("w_at", "w_bt", "u_at", "u_bt", "bias_ih", "bias_hh")
    return {n: getattr(gru, n).detach().float().cpu() for n in names}


def _scan_nodes(gru: nn.Module) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers of the ``"scan"`` form (module docstring)."""
    buf, w_fac, u_fac = _buffers(gru), bool(gru.w_factored), bool(gru.u_factored)
    w_at, w_bt, u_at, u_bt = buf["w_at"], buf["w_bt"], buf["u_at"], buf["u_bt"]
    b_ih, b_hh = buf["bias_ih"], buf["bias_hh"]
    hid = b_ih.shape[0] // 3
    b_gi = b_ih.clone()
    b_gi[: 2 * hid] += b_hh[: 2 * hid]
    inits = [
        _init("w_at", w_at),
        _init("b_gi", b_gi),
        _init("b_hn", b_hh[2 * hid :]),
        _init("u_at", u_at),
        _init("split_gates", np.array([2 * hid, hid], np.int64)),
        _init("split_rz", np.array([hid, hid], np.int64)),
    ]
    nodes = [helper.make_node("Transpose", ["x"], ["x_tbi"], perm=[1, 0, 2])]
    x_in = "x_tbi"
    if w_fac:
        inits.append(_init("w_bt", w_bt))
        nodes.append(helper.make_node("MatMul", [x_in, "w_bt"], ["x_r"]))
        x_in = "x_r"
    nodes += [
        helper.make_node("MatMul", [x_in, "w_at"], ["gi_nob"]),
        helper.make_node("Add", ["gi_nob", "b_gi"], ["gi"]),  # [T, B, 3H]
    ]
    body = []
    h_in = "h_prev"
    if u_fac:
        inits.append(_init("u_bt", u_bt))
        body.append(helper.make_node("MatMul", ["h_prev", "u_bt"], ["hu"]))
        h_in = "hu"
    body += [
        helper.make_node("MatMul", [h_in, "u_at"], ["gh"]),
        helper.make_node("Split", ["gi_t", "split_gates"], ["gi_rz", "gi_n"], axis=1),
        helper.make_node("Split", ["gh", "split_gates"], ["gh_rz", "gh_n"], axis=1),
        helper.make_node("Add", ["gi_rz", "gh_rz"], ["a_rz"]),
        helper.make_node("Sigmoid", ["a_rz"], ["rz"]),
        helper.make_node("Split", ["rz", "split_rz"], ["r", "z"], axis=1),
        helper.make_node("Add", ["gh_n", "b_hn"], ["gh_nb"]),
        helper.make_node("Mul", ["r", "gh_nb"], ["r_gh"]),
        helper.make_node("Add", ["gi_n", "r_gh"], ["a_n"]),
        helper.make_node("Tanh", ["a_n"], ["n"]),
        helper.make_node("Sub", ["h_prev", "n"], ["h_minus_n"]),
        helper.make_node("Mul", ["z", "h_minus_n"], ["z_hn"]),
        helper.make_node("Add", ["n", "z_hn"], ["h_next"]),
        helper.make_node("Identity", ["h_next"], ["y_t"]),
    ]
    f32 = TensorProto.FLOAT
    body_graph = helper.make_graph(
        body,
        "gru_step",
        [
            helper.make_tensor_value_info("h_prev", f32, ["batch", hid]),
            helper.make_tensor_value_info("gi_t", f32, ["batch", 3 * hid]),
        ],
        [
            helper.make_tensor_value_info("h_next", f32, ["batch", hid]),
            helper.make_tensor_value_info("y_t", f32, ["batch", hid]),
        ],
    )
    nodes += [
        helper.make_node("Scan", ["h0", "gi"], ["h", "y_tbh"], num_scan_inputs=1, body=body_graph),
        helper.make_node("Transpose", ["y_tbh"], ["y"], perm=[1, 0, 2]),
    ]
    return nodes, inits


def _gru_op_nodes(gru: nn.Module) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers of the ``"gru_op"`` form: ONNX GRU over the dense W and U."""
    buf = _buffers(gru)
    w_t = _dense(buf["w_at"], buf["w_bt"], bool(gru.w_factored))  # [I, 3H]
    u_t = _dense(buf["u_at"], buf["u_bt"], bool(gru.u_factored))
    b_ih, b_hh = buf["bias_ih"], buf["bias_hh"]
    hid = b_ih.shape[0] // 3
    ar = torch.arange(hid)
    order = torch.cat([ar + hid, ar, ar + 2 * hid])  # torch's r, z, n -> ONNX's z, r, h
    inits = [
        _init("W", w_t.t()[order][None]),  # [1, 3H, I], gates z, r, h
        _init("R", u_t.t()[order][None]),
        _init("B", torch.cat([b_ih[order], b_hh[order]])[None]),
        _init("axis1", np.array([1], np.int64)),
        _init("axis0", np.array([0], np.int64)),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_tbi"], perm=[1, 0, 2]),
        helper.make_node("Unsqueeze", ["h0", "axis0"], ["h0_1"]),
        helper.make_node(
            "GRU",
            ["x_tbi", "W", "R", "B", "", "h0_1"],
            ["y_t1bh", "h_1"],
            hidden_size=hid,
            linear_before_reset=1,
        ),
        helper.make_node("Squeeze", ["y_t1bh", "axis1"], ["y_tbh"]),
        helper.make_node("Transpose", ["y_tbh"], ["y"], perm=[1, 0, 2]),
        helper.make_node("Squeeze", ["h_1", "axis0"], ["h"]),
    ]
    return nodes, inits


def cnn_graph(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> onnx.ModelProto:
    """An unparametrized eval-mode CNN as ONNX (input "x" [batch, ...], output "y")."""
    buffer = io.BytesIO()
    torch.onnx.export(
        model.eval(),
        (example,),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    return onnx.load_model_from_string(buffer.getvalue())


def ort_session(model: onnx.ModelProto | bytes, threads: int = 1):  # -> InferenceSession
    """An ``onnxruntime.InferenceSession`` on CPU with ``threads`` intra-op threads, one
    inter-op thread and all graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_ort(session, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """Run ``session`` on torch tensors (in the graph's input order); outputs as tensors."""
    feed = {i.name: _array(t) for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def fastgrnn_graph(layer: nn.Module, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX graph of a FastGRNN ``RNNLayer`` (``strlowrank.method.fastgrnn``), at its exported
    ranks: inputs x [B, T, I], h0 [B, H]; outputs y [B, T, H], h_T [B, H]. Outside the loop
    wx = (x B_W^T) A_W^T (one MatMul when W is dense) plus b_z and b_h; an ONNX ``Scan`` step is

        u = (h B_U^T) A_U^T,  z = sigmoid(wx_z + u),  c = tanh(wx_h + u),
        h' = (zeta + nu) c + z (h - zeta c)
    """
    compact = layer.export()
    hid, in_f, f32 = int(compact.hidden_size), int(compact.input_size), TensorProto.FLOAT
    zeta = torch.sigmoid(compact.zeta.detach().float())
    keep = zeta + torch.sigmoid(compact.nu.detach().float())
    inits = [
        _init("b_z", compact.bias_ih),
        _init("b_h", compact.bias_hh),
        _init("zeta", zeta.reshape(1)),
        _init("keep", keep.reshape(1)),
    ]
    nodes = [helper.make_node("Transpose", ["x"], ["x_tbi"], perm=[1, 0, 2])]
    nodes += _factor_matmuls("x_tbi", "w", compact.W, inits, "wx")
    nodes += [
        helper.make_node("Add", ["wx", "b_z"], ["gz"]),
        helper.make_node("Add", ["wx", "b_h"], ["gc"]),
        helper.make_node(
            "Scan",
            ["h0", "gz", "gc"],
            ["h", "y_tbh"],
            num_scan_inputs=2,
            body=_fastgrnn_step(compact.U, inits, hid),
        ),
        helper.make_node("Transpose", ["y_tbh"], ["y"], perm=[1, 0, 2]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", f32, ["batch", "time", in_f]),
        helper.make_tensor_value_info("h0", f32, ["batch", hid]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", f32, ["batch", "time", hid]),
        helper.make_tensor_value_info("h", f32, ["batch", hid]),
    ]
    graph = helper.make_graph(nodes, "strlowrank_fastgrnn", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="strlowrank"
    )
    onnx.checker.check_model(model)
    return model


def _fastgrnn_step(u: nn.Module, inits: list, hid: int) -> onnx.GraphProto:
    """The Scan body of `fastgrnn_graph`: (h_prev, gz_t, gc_t) -> (h_next, y_t)."""
    body = _factor_matmuls("h_prev", "u", u, inits, "uh")
    body += [
        helper.make_node("Add", ["gz_t", "uh"], ["a_z"]),
        helper.make_node("Sigmoid", ["a_z"], ["z"]),
        helper.make_node("Add", ["gc_t", "uh"], ["a_c"]),
        helper.make_node("Tanh", ["a_c"], ["c"]),
        helper.make_node("Mul", ["c", "zeta"], ["zeta_c"]),
        helper.make_node("Sub", ["h_prev", "zeta_c"], ["h_minus"]),
        helper.make_node("Mul", ["z", "h_minus"], ["z_h"]),
        helper.make_node("Mul", ["c", "keep"], ["keep_c"]),
        helper.make_node("Add", ["keep_c", "z_h"], ["h_next"]),
        helper.make_node("Identity", ["h_next"], ["y_t"]),
    ]
    f32 = TensorProto.FLOAT
    names_in, names_out = ("h_prev", "gz_t", "gc_t"), ("h_next", "y_t")
    return helper.make_graph(
        body,
        "fastgrnn_step",
        [helper.make_tensor_value_info(n, f32, ["batch", hid]) for n in names_in],
        [helper.make_tensor_value_info(n, f32, ["batch", hid]) for n in names_out],
    )


def _factor_matmuls(
    source: str, name: str, matrix: nn.Module, inits: list, out: str
) -> list[onnx.NodeProto]:
    """``out = source @ M^T`` for an exported matrix M: two MatMuls through its factors A B when
    they are stored (a ``LowRankMatrix``), else one MatMul with the dense M (initializers are
    appended to ``inits``)."""
    a, b = matrix.factors()
    if factored_is_cheaper(a.shape[1], a.shape[0], b.shape[1]):
        inits += [_init(f"{name}_bt", b.t()), _init(f"{name}_at", a.t())]
        return [
            helper.make_node("MatMul", [source, f"{name}_bt"], [f"{out}_r"]),
            helper.make_node("MatMul", [f"{out}_r", f"{name}_at"], [out]),
        ]
    inits.append(_init(f"{name}_t", (a @ b).t()))
    return [helper.make_node("MatMul", [source, f"{name}_t"], [out])]
