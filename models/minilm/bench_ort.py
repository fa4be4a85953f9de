"""Raw onnxruntime on the MiniLM model: the baseline the agent's benchmark compares against.

Runs one InferenceSession (the CPU or CUDA provider, the given intra-op thread count, spinning
off as the agent has it) on batches of sentences tokenised to exactly --seq-len tokens, and
prints one JSON line: {"batch", "per_second" (sentences), "p50_ms", "p99_ms", "samples_ms"
(each run's time, in order)} per batch size.

Usage:
    python3 models/minilm/bench_ort.py --threads 2 --batches 1,8,32 [--iterations 50] [--provider cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=root / "models/minilm/out")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    wanted = PROVIDERS[args.provider]
    session = ort.InferenceSession(str(args.model_dir / "model.onnx"), options, providers=[wanted])
    # onnxruntime falls back to the CPU when a provider cannot start; timing that as CUDA would be wrong.
    if session.get_providers()[0] != wanted:
        print(f"asked for {wanted}, the session runs on {session.get_providers()}", file=sys.stderr)
        return 1
    names = [i.name for i in session.get_inputs()]

    for batch in [int(b) for b in args.batches.split(",")]:
        # [CLS] ids... [SEP]: the token values do not change the cost, the shape does.
        ids = np.full((batch, args.seq_len), 2023, dtype=np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        }
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(5):
            session.run(None, feeds)
        samples = []
        for _ in range(args.iterations):
            started = time.perf_counter()
            (hidden, *_) = session.run(None, feeds)
            # The agent pools and normalises too; do the same so the work matches.
            pooled = hidden.mean(axis=1)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            samples.append(time.perf_counter() - started)
        ordered = sorted(samples)
        pick = lambda q: ordered[min(int(len(ordered) * q), len(ordered) - 1)] * 1e3  # noqa: E731
        print(
            json.dumps(
                {
                    "batch": batch,
                    "per_second": batch * len(samples) / sum(samples),
                    "p50_ms": pick(0.5),
                    "p99_ms": pick(0.99),
                    "samples_ms": [s * 1e3 for s in samples],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
