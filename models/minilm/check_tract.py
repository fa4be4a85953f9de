"""Check that tract (through `flotilla bundle pack`) and Python onnxruntime agree on MiniLM.

`flotilla bundle pack` computes every self-test's expected embeddings by running the model with
tract, the agent's default backend. This script packs the built model directory, reads those
embeddings back with `flotilla bundle inspect --json`, computes the same embeddings with
onnxruntime (tokenizers, masked mean pooling, L2 normalisation), and fails unless they agree
within 1e-4 per element.

Usage:
    python3 models/minilm/check_tract.py [--model-dir models/minilm/out] [--flotilla PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bundle_files import encode_batch, mean_pool_normalized  # noqa: E402

TOLERANCE = 1e-4


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=root / "models/minilm/out")
    parser.add_argument("--flotilla", type=Path, default=root / "target/release/flotilla")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "minilm.fbundle"
        subprocess.run([str(args.flotilla), "bundle", "pack", str(args.model_dir), "--out", str(bundle)], check=True)
        inspected = subprocess.run(
            [str(args.flotilla), "bundle", "inspect", str(bundle), "--json"], check=True, capture_output=True, text=True
        )
    manifest = json.loads(inspected.stdout)["manifest"]

    tokenizer = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    session = ort.InferenceSession(str(args.model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    max_length = manifest["model"]["text"]["max_sequence_length"]

    worst = 0.0
    for test in manifest["self_tests"]:
        texts = test["input"]["texts"]
        feeds = encode_batch(tokenizer, texts, max_length)
        (hidden,) = session.run(["last_hidden_state"], feeds)
        reference = mean_pool_normalized(hidden, feeds["attention_mask"])
        expected = test["expected"][0]
        tract = np.array(expected["data"], dtype=np.float64).reshape(expected["shape"])
        diff = float(np.abs(tract - reference).max())
        worst = max(worst, diff)
        print(f"self-test {test['name']}: {len(texts)} text(s), tract vs onnxruntime max abs diff {diff:.2e}")

    if worst > TOLERANCE:
        print(f"FAIL: tract and onnxruntime differ by {worst:.2e} (allowed {TOLERANCE:.0e})")
        return 1
    print(f"ok: tract and onnxruntime agree within {TOLERANCE:.0e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
