"""Build plain opset-14 ONNX graphs for BERT-style encoders from HuggingFace weights.

The graph uses only primitive, non-fused operators (LayerNorm spelled out with
ReduceMean/Sub/Mul/Sqrt/Div, GELU spelled out with Erf), the way a plain PyTorch
export of `BertModel` looks, so both tract-onnx and onnxruntime can load it.

Weights come in as a dict of numpy arrays keyed by HuggingFace `BertModel`
names without the `bert.` prefix (`embeddings.word_embeddings.weight`,
`encoder.layer.0.attention.self.query.weight`, ...). Dense weights use the
PyTorch `Linear` layout `[out_features, in_features]`. A classifier additionally
needs `pooler.dense.*` and `classifier.*`, as in `BertForSequenceClassification`.

`reference_forward` is an independent numpy implementation of the same network;
`verify_against_reference` runs the ONNX graph in onnxruntime and raises when the
two disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 14
# IR version 8 is the one that goes with opsets 14-15; loaders that predate newer IR
# versions still accept it.
IR_VERSION = 8
PRODUCER = "flotilla-models"

# Added to attention scores of padded positions, as in the original BERT code.
MASK_NEGATIVE = -10000.0

ENCODER_OUTPUT = "last_hidden_state"
CLASSIFIER_OUTPUT = "logits"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class BertWeightsError(ValueError):
    """The weight dict does not fit the config: a tensor is missing, unexpected or misshapen."""


@dataclass(frozen=True)
class BertConfig:
    """Shape of the network. Sizes not listed here are read from the weights.

    `num_labels` is None for a plain encoder (output `last_hidden_state`) and the
    number of classes for a classifier (pooler + classifier head, output `logits`).
    """

    hidden: int
    heads: int
    layers: int
    eps: float = 1e-12
    num_labels: int | None = None

    def __post_init__(self) -> None:
        if self.hidden <= 0 or self.heads <= 0 or self.layers <= 0:
            raise ValueError(f"bert config sizes must be positive: {self}")
        if self.hidden % self.heads != 0:
            raise ValueError(
                f"hidden size {self.hidden} is not divisible by {self.heads} attention heads"
            )
        if self.num_labels is not None and self.num_labels <= 0:
            raise ValueError(f"num_labels must be positive, got {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_classifier(self) -> bool:
        return self.num_labels is not None


@dataclass(frozen=True)
class BertSizes:
    """Table and layer sizes that the weights carry rather than the config."""

    vocab: int
    max_positions: int
    type_vocab: int
    intermediate: int


def weight_shapes(config: BertConfig, sizes: BertSizes) -> dict[str, tuple[int, ...]]:
    """Every tensor name the network uses, in a fixed order, with its expected shape."""
    h = config.hidden
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (sizes.vocab, h),
        "embeddings.position_embeddings.weight": (sizes.max_positions, h),
        "embeddings.token_type_embeddings.weight": (sizes.type_vocab, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(config.layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"] = (h, h)
            shapes[f"{p}attention.self.{name}.bias"] = (h,)
        shapes[f"{p}attention.output.dense.weight"] = (h, h)
        shapes[f"{p}attention.output.dense.bias"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{p}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{p}intermediate.dense.weight"] = (sizes.intermediate, h)
        shapes[f"{p}intermediate.dense.bias"] = (sizes.intermediate,)
        shapes[f"{p}output.dense.weight"] = (h, sizes.intermediate)
        shapes[f"{p}output.dense.bias"] = (h,)
        shapes[f"{p}output.LayerNorm.weight"] = (h,)
        shapes[f"{p}output.LayerNorm.bias"] = (h,)
    if config.is_classifier:
        shapes["pooler.dense.weight"] = (h, h)
        shapes["pooler.dense.bias"] = (h,)
        shapes["classifier.weight"] = (config.num_labels, h)
        shapes["classifier.bias"] = (config.num_labels,)
    return shapes


def sizes_from_weights(weights: dict[str, np.ndarray]) -> BertSizes:
    """Read vocab, position, token-type and intermediate sizes off the weight tensors."""

    def leading(name: str) -> int:
        if name not in weights:
            raise BertWeightsError(f"missing weight {name}")
        return int(weights[name].shape[0])

    return BertSizes(
        vocab=leading("embeddings.word_embeddings.weight"),
        max_positions=leading("embeddings.position_embeddings.weight"),
        type_vocab=leading("embeddings.token_type_embeddings.weight"),
        intermediate=leading("encoder.layer.0.intermediate.dense.weight"),
    )


def check_weights(config: BertConfig, weights: dict[str, np.ndarray]) -> None:
    """Raise `BertWeightsError` unless `weights` holds exactly the float tensors `config` needs."""
    shapes = weight_shapes(config, sizes_from_weights(weights))

    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise BertWeightsError(f"missing weights: {', '.join(missing)}")
    unexpected = sorted(set(weights) - set(shapes))
    if unexpected:
        raise BertWeightsError(
            f"unexpected weights (not used by this config): {', '.join(unexpected)}"
        )

    for name, shape in shapes.items():
        array = weights[name]
        if tuple(array.shape) != shape:
            raise BertWeightsError(
                f"weight {name} has shape {tuple(array.shape)}, expected {shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise BertWeightsError(f"weight {name} has dtype {array.dtype}, expected a float type")
        if not np.all(np.isfinite(array)):
            raise BertWeightsError(f"weight {name} contains NaN or infinity")


class _GraphBuilder:
    """Accumulates nodes and initializers with unique, readable names."""

    def __init__(self, share_identical: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0
        # With share_identical, an initializer equal to one already added is not stored again:
        # the graph reads the first copy (weight sharing across layers, as in ALBERT).
        self._share = share_identical
        self._by_content: dict[tuple, str] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.array(array, order="C")
        if self._share:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key in self._by_content:
                return self._by_content[key]
            self._by_content[key] = name
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str, **attrs) -> str:
        self._counter += 1
        output = f"{prefix}/{op_type}_{self._counter}"
        self.nodes.append(
            helper.make_node(
                op_type, inputs, [output], name=f"{prefix}/{op_type}_node_{self._counter}", **attrs
            )
        )
        return output

    def rename_last(self, output: str) -> None:
        """Make the last node write to the graph output called `output`."""
        self.nodes[-1].output[0] = output


def _dense(g: _GraphBuilder, x: str, weights: dict, name: str) -> str:
    """x @ W.T + b with W in PyTorch [out, in] layout, stored transposed for MatMul."""
    w = g.const(f"{name}.weight.T", weights[f"{name}.weight"].astype(np.float32).T)
    b = g.const(f"{name}.bias", weights[f"{name}.bias"].astype(np.float32))
    return g.op("Add", [g.op("MatMul", [x, w], name), b], name)


def _layer_norm(g: _GraphBuilder, x: str, weights: dict, name: str, eps_name: str) -> str:
    mean = g.op("ReduceMean", [x], name, axes=[-1], keepdims=1)
    centered = g.op("Sub", [x, mean], name)
    variance = g.op(
        "ReduceMean", [g.op("Mul", [centered, centered], name)], name, axes=[-1], keepdims=1
    )
    std = g.op("Sqrt", [g.op("Add", [variance, eps_name], name)], name)
    normalized = g.op("Div", [centered, std], name)
    gamma = g.const(f"{name}.weight", weights[f"{name}.weight"].astype(np.float32))
    beta = g.const(f"{name}.bias", weights[f"{name}.bias"].astype(np.float32))
    return g.op("Add", [g.op("Mul", [normalized, gamma], name), beta], name)


def _gelu(g: _GraphBuilder, x: str, name: str, consts: dict[str, str]) -> str:
    """Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    erf = g.op("Erf", [g.op("Div", [x, consts["sqrt2"]], name)], name)
    return g.op(
        "Mul",
        [g.op("Mul", [x, g.op("Add", [erf, consts["one"]], name)], name), consts["half"]],
        name,
    )


def build_bert_model(
    weights: dict[str, np.ndarray],
    config: BertConfig,
    graph_name: str,
    share_identical: bool = False,
) -> onnx.ModelProto:
    """Build and check the ONNX model for `config`; raises `BertWeightsError` on bad weights.

    Inputs `input_ids`, `attention_mask`, `token_type_ids`: INT64 [batch, sequence].
    Output `last_hidden_state` FP32 [batch, sequence, hidden] for an encoder, or
    `logits` FP32 [batch, num_labels] for a classifier. Sequences longer than the
    position-embedding table make the model fail at run time.
    """
    check_weights(config, weights)
    g = _GraphBuilder(share_identical)
    h, heads, head_dim = config.hidden, config.heads, config.head_dim

    consts = {
        "eps": g.const("const.eps", np.array(config.eps, dtype=np.float32)),
        "one": g.const("const.one", np.array(1.0, dtype=np.float32)),
        "half": g.const("const.half", np.array(0.5, dtype=np.float32)),
        "sqrt2": g.const("const.sqrt2", np.array(math.sqrt(2.0), dtype=np.float32)),
        "mask_negative": g.const("const.mask_negative", np.array(MASK_NEGATIVE, dtype=np.float32)),
        "score_scale": g.const(
            "const.score_scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32)
        ),
        "zero_1d": g.const("const.zero_1d", np.array([0], dtype=np.int64)),
        "one_scalar": g.const("const.one_scalar", np.array(1, dtype=np.int64)),
        "split_heads": g.const(
            "const.split_heads", np.array([0, 0, heads, head_dim], dtype=np.int64)
        ),
        "merge_heads": g.const("const.merge_heads", np.array([0, 0, h], dtype=np.int64)),
    }

    # Embeddings: word + position (rows 0..sequence of the table) + token type, then LayerNorm.
    p = "embeddings"
    word_table = g.const(
        f"{p}.word_embeddings.weight", weights[f"{p}.word_embeddings.weight"].astype(np.float32)
    )
    position_table = g.const(
        f"{p}.position_embeddings.weight",
        weights[f"{p}.position_embeddings.weight"].astype(np.float32),
    )
    type_table = g.const(
        f"{p}.token_type_embeddings.weight",
        weights[f"{p}.token_type_embeddings.weight"].astype(np.float32),
    )
    words = g.op("Gather", [word_table, "input_ids"], p, axis=0)
    sequence_len = g.op(
        "Gather", [g.op("Shape", ["input_ids"], p), consts["one_scalar"]], p, axis=0
    )
    sequence_end = g.op("Unsqueeze", [sequence_len, consts["zero_1d"]], p)
    positions = g.op(
        "Slice", [position_table, consts["zero_1d"], sequence_end, consts["zero_1d"]], p
    )
    types = g.op("Gather", [type_table, "token_type_ids"], p, axis=0)
    summed = g.op("Add", [g.op("Add", [words, positions], p), types], p)
    hidden = _layer_norm(g, summed, weights, f"{p}.LayerNorm", consts["eps"])

    # Additive mask [batch, 1, 1, sequence]: 0 for real tokens, MASK_NEGATIVE for padding.
    p = "attention_mask"
    mask = g.op("Cast", ["attention_mask"], p, to=TensorProto.FLOAT)
    mask = g.op(
        "Unsqueeze", [mask, g.const("const.mask_axes", np.array([1, 2], dtype=np.int64))], p
    )
    mask = g.op("Mul", [g.op("Sub", [consts["one"], mask], p), consts["mask_negative"]], p)

    for i in range(config.layers):
        p = f"encoder.layer.{i}"

        def heads_first(x: str, perm: list[int]) -> str:
            return g.op("Transpose", [g.op("Reshape", [x, consts["split_heads"]], p)], p, perm=perm)

        query = heads_first(_dense(g, hidden, weights, f"{p}.attention.self.query"), [0, 2, 1, 3])
        key_t = heads_first(_dense(g, hidden, weights, f"{p}.attention.self.key"), [0, 2, 3, 1])
        value = heads_first(_dense(g, hidden, weights, f"{p}.attention.self.value"), [0, 2, 1, 3])

        scores = g.op("Mul", [g.op("MatMul", [query, key_t], p), consts["score_scale"]], p)
        probs = g.op("Softmax", [g.op("Add", [scores, mask], p)], p, axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, value], p)], p, perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, consts["merge_heads"]], p)

        attended = _dense(g, context, weights, f"{p}.attention.output.dense")
        hidden = _layer_norm(
            g,
            g.op("Add", [attended, hidden], p),
            weights,
            f"{p}.attention.output.LayerNorm",
            consts["eps"],
        )

        inner = _gelu(g, _dense(g, hidden, weights, f"{p}.intermediate.dense"), p, consts)
        out = _dense(g, inner, weights, f"{p}.output.dense")
        hidden = _layer_norm(
            g, g.op("Add", [out, hidden], p), weights, f"{p}.output.LayerNorm", consts["eps"]
        )

    if config.is_classifier:
        first = g.const("const.zero_scalar", np.array(0, dtype=np.int64))
        cls = g.op("Gather", [hidden, first], "pooler", axis=1)
        pooled = g.op("Tanh", [_dense(g, cls, weights, "pooler.dense")], "pooler")
        _dense(g, pooled, weights, "classifier")
        g.rename_last(CLASSIFIER_OUTPUT)
        output = helper.make_tensor_value_info(
            CLASSIFIER_OUTPUT, TensorProto.FLOAT, ["batch", config.num_labels]
        )
    else:
        g.rename_last(ENCODER_OUTPUT)
        output = helper.make_tensor_value_info(
            ENCODER_OUTPUT, TensorProto.FLOAT, ["batch", "sequence", h]
        )

    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in INPUT_NAMES
    ]
    graph = helper.make_graph(g.nodes, graph_name, inputs, [output], initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------
# numpy reference


def _np_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * gamma + beta


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _np_gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def reference_forward(
    weights: dict[str, np.ndarray],
    config: BertConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray,
) -> np.ndarray:
    """The network in plain float64 numpy, written from the BERT definition, not from the graph.

    Returns `last_hidden_state` [batch, sequence, hidden] for an encoder config and
    `logits` [batch, num_labels] for a classifier config.
    """
    check_weights(config, weights)
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    batch, seq = input_ids.shape
    if seq > w["embeddings.position_embeddings.weight"].shape[0]:
        raise ValueError(f"sequence length {seq} exceeds the position-embedding table")

    def dense(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][np.arange(seq)][None, :, :]
        + w["embeddings.token_type_embeddings.weight"][token_type_ids]
    )
    x = _np_layer_norm(
        x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], config.eps
    )
    additive_mask = (1.0 - attention_mask.astype(np.float64))[:, None, None, :] * MASK_NEGATIVE

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(batch, seq, config.heads, config.head_dim).transpose(0, 2, 1, 3)

    for i in range(config.layers):
        p = f"encoder.layer.{i}"
        q = split(dense(x, f"{p}.attention.self.query"))
        k = split(dense(x, f"{p}.attention.self.key"))
        v = split(dense(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(config.head_dim) + additive_mask
        context = (_np_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, config.hidden)
        x = _np_layer_norm(
            dense(context, f"{p}.attention.output.dense") + x,
            w[f"{p}.attention.output.LayerNorm.weight"],
            w[f"{p}.attention.output.LayerNorm.bias"],
            config.eps,
        )
        inner = _np_gelu(dense(x, f"{p}.intermediate.dense"))
        x = _np_layer_norm(
            dense(inner, f"{p}.output.dense") + x,
            w[f"{p}.output.LayerNorm.weight"],
            w[f"{p}.output.LayerNorm.bias"],
            config.eps,
        )

    if not config.is_classifier:
        return x
    pooled = np.tanh(dense(x[:, 0, :], "pooler.dense"))
    return dense(pooled, "classifier")


def run_onnxruntime(
    model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray]
) -> np.ndarray:
    """Run the model's single output in onnxruntime on CPU."""
    import onnxruntime

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, feeds)
    return output


def verify_against_reference(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    config: BertConfig,
    feeds: dict[str, np.ndarray],
    atol: float,
) -> float:
    """Compare onnxruntime with `reference_forward`; return the max abs diff, raise if above `atol`."""
    actual = run_onnxruntime(model, feeds)
    expected = reference_forward(
        weights, config, feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]
    )
    if actual.shape != expected.shape:
        raise AssertionError(
            f"onnxruntime output shape {actual.shape} != reference shape {expected.shape}"
        )
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    if not diff <= atol:
        raise AssertionError(
            f"onnxruntime differs from the numpy reference by {diff:.3g} (allowed {atol:.3g})"
        )
    return diff
