"""Shared by generate.py and minilm/build.py: the agent's text pipeline in numpy, and bundle.toml writing.

The pipeline functions mirror what the Rust agent does with a text model's output
(pad to the longest text, masked mean pooling, L2 normalisation, softmax), so that
expected values computed here match what the agent computes.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# The `[requirements]` table of every bundle written here: any agent, any CPU, both backends.
DEFAULT_REQUIREMENTS = {
    "min_agent_version": "0.1.0",
    "architectures": [],
    "backends": ["tract", "ort"],
    "accelerator": False,
}

PAD_ID = 0


def encode_batch(
    tokenizer: Tokenizer, texts: list[str], max_length: int, pair: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Tokenize `texts` (or text pairs) and pad with [PAD], attention mask 0, to the longest.

    Raises instead of truncating: inputs here are fixtures and must fit `max_length`.
    """
    if not texts:
        raise ValueError("cannot encode an empty batch")
    if pair is None:
        encodings = [tokenizer.encode(text) for text in texts]
    else:
        encodings = [tokenizer.encode(a, b) for a, b in zip(texts, pair, strict=True)]
    longest = max(len(e.ids) for e in encodings)
    if longest > max_length:
        raise ValueError(f"text of {longest} tokens exceeds the maximum of {max_length}")

    def padded(rows: Iterable[list[int]]) -> np.ndarray:
        return np.array([row + [PAD_ID] * (longest - len(row)) for row in rows], dtype=np.int64)

    return {
        "input_ids": padded(e.ids for e in encodings),
        "attention_mask": padded(e.attention_mask for e in encodings),
        "token_type_ids": padded(e.type_ids for e in encodings),
    }


def mean_pool_normalized(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of `hidden` [batch, sequence, dim] over unmasked tokens, then L2-normalised.

    This is the agent's `pooling = "mean"` with `normalize = true`.
    """
    mask = attention_mask.astype(np.float64)[:, :, None]
    summed = (hidden.astype(np.float64) * mask).sum(axis=1)
    pooled = summed / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis: the agent's classification probabilities."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def f32(values: np.ndarray) -> list[float]:
    """Shortest decimal for each float32 value, so a float32 parse gives the same bits back."""
    return [float(str(np.float32(v))) for v in np.asarray(values, dtype=np.float32).ravel()]


def tensor(name: str, array: np.ndarray) -> dict:
    """A tensor in the Open Inference Protocol form used by bundle.toml and the fixtures."""
    if array.dtype == np.int64:
        data: list = [int(v) for v in array.ravel()]
        datatype = "INT64"
    elif array.dtype == np.float32:
        data = f32(array)
        datatype = "FP32"
    else:
        raise TypeError(f"tensor {name}: unsupported dtype {array.dtype}")
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def _toml_value(value, indent: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite float {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        # A JSON string without ASCII escaping is also a valid TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        items = [_toml_value(v) for v in value]
        one_line = "[" + ", ".join(items) + "]"
        if len(one_line) <= 90:
            return one_line
        rows = [", ".join(items[i : i + 6]) for i in range(0, len(items), 6)]
        return "[\n" + "".join(f"{indent}    {row},\n" for row in rows) + f"{indent}]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_table(table: dict, path: str = "") -> list[str]:
    """Plain keys first, then sub-tables, then arrays of tables, as TOML requires."""
    lines = [
        f"{key} = {_toml_value(v)}"
        for key, v in table.items()
        if not isinstance(v, dict) and not _is_table_array(v)
    ]
    for key, v in table.items():
        full = f"{path}.{key}" if path else key
        if isinstance(v, dict):
            lines += ["", f"[{full}]"] + _toml_table(v, full)
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{full}]]"] + _toml_table(item, full)
    return lines


def write_bundle_toml(path: Path, bundle: dict, comment: str, generator: str) -> None:
    """Write `bundle` as TOML under a `#` comment; raise unless it parses back to the same value."""
    header = [f"# {line}".rstrip() for line in comment.strip().splitlines()]
    header.append(f"# Generated by {generator}; edit that script, not this file.")
    text = "\n".join(header + [""] + _toml_table(bundle)) + "\n"
    if tomllib.loads(text) != json.loads(json.dumps(bundle)):
        raise AssertionError(f"{path}: TOML writer did not round-trip")
    path.write_text(text, encoding="utf-8")


def write_json(path: Path, value) -> None:
    """Indented UTF-8 JSON with a trailing newline."""
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
