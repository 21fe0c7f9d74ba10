"""Decoder latency: onnxruntime vs PyTorch, same model, same machine, one run.

For each arch (models with the train params' defaults, 1×28×28, or the trained checkpoint with
--checkpoint) the decoder z → image (the likelihood's mean included) is timed at batch 1 and 256 as
  torch eager            model.decode(z), autograd on, as a naive caller would
  torch inference_mode   the same under torch.inference_mode()
  onnxruntime            CPUExecutionProvider, the session options `vaeops sample` uses (ORT's
                         defaults: full graph optimization; tuning threads or the optimization
                         level measured no better here)
Both runtimes get the same number of intra-op threads (torch's default, or --threads).
Rounds interleave the contenders so load from other processes hits all of them alike; p50/p95 are
over every timed call. Ratio = p50 / torch eager's p50 (target for onnxruntime at batch 1: ≤ 0.5).

    .venv/bin/python benchmarks/decode_latency.py [--checkpoint models/vae.pt] [--archs mlp,conv,resnet]
                                                  [--rounds 10] [--threads 1]
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from vaeops.config import TrainParams
from vaeops.model.checkpoint import load_checkpoint, model_from_checkpoint
from vaeops.model.vae import VAE, build_model, model_config
from vaeops.sample import session_options
from vaeops.stages import export


def timed(fn: Callable[[], object], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def contenders(model: VAE, onnx_path: Path, z: np.ndarray, threads: int) -> dict[str, Callable[[], object]]:
    tz = torch.from_numpy(z)
    opts = session_options()
    opts.intra_op_num_threads = threads  # same thread count as torch
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

    def inference_mode() -> object:
        with torch.inference_mode():
            return model.decode(tz)

    return {
        "torch eager": lambda: model.decode(tz),
        "torch inference_mode": inference_mode,
        "onnxruntime": lambda: session.run(None, {"z": z}),
    }


def bench(
    model: VAE, path: Path, batch: int, rounds: int, calls: int, threads: int
) -> dict[str, list[float]]:
    z = np.random.default_rng(0).standard_normal((batch, model.latent_dim), dtype=np.float32)
    fns = contenders(model, path, z, threads)
    for fn in fns.values():  # warm-up: allocator, thread pools, first-run kernels
        timed(fn, max(3, calls // 5))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += timed(fn, calls)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a trained models/vae.pt (default: both archs, random)")
    ap.add_argument("--archs", default="mlp,conv", help="comma-separated archs (without --checkpoint)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=50, help="calls per round at batch 1 (÷ 10 at batch 256)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for both (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    if args.checkpoint:
        models = {"checkpoint": model_from_checkpoint(load_checkpoint(args.checkpoint))}
    else:
        torch.manual_seed(0)
        configs = {
            arch: model_config(TrainParams(arch=arch), (1, 28, 28), "mnist") for arch in args.archs.split(",")
        }
        models = {arch: build_model(config).eval() for arch, config in configs.items()}

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} intra-op threads each")
    print(f"{'model':<10} {'batch':>5}  {'runtime':<22} {'p50 ms':>9} {'p95 ms':>9} {'p50 / eager':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            example = torch.randn(export.EXAMPLE_BATCH, model.latent_dim)
            onnx.save_model(export.to_onnx(export.Decoder(model), example, "z", ["image"], 18), path)
            for batch in (1, 256):
                calls = args.calls if batch == 1 else max(2, args.calls // 10)
                samples = bench(model, path, batch, args.rounds, calls, threads)
                eager_ms = float(np.median(samples["torch eager"])) * 1e3
                for runtime, s in samples.items():
                    p50, p95 = np.percentile(s, [50, 95]) * 1e3
                    row = f"{name:<10} {batch:>5}  {runtime:<22} {p50:>9.3f} {p95:>9.3f}"
                    print(f"{row} {p50 / eager_ms:>11.2f}")


if __name__ == "__main__":
    main()
