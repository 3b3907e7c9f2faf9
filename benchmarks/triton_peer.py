"""NVIDIA Triton (through PyTriton) serving one ONNX model with ONNX Runtime inside: the peer of the
`triton` section of benchmarks/serving.py.

Run by the Triton venv's own python (`make triton-venv`), never the project's: PyTriton pins its own
numpy and tritonclient. It imports nothing from the project, so it runs from any checkout:

    .venv-triton/bin/python benchmarks/triton_peer.py --onnx MODEL.onnx --model resnet18 --port 8000

Triton's HTTP endpoint (KServe v2, JSON and the binary tensor extension) answers on 127.0.0.1:PORT;
gRPC and Triton's metrics listen on free ports of their own. The model is one instance behind
Triton's dynamic batcher with committee-serve's defaults: at most 32 images a batch, no queue delay
(a batch is cut as soon as the instance is free). The ONNX Runtime session has committee-serve's
options too (all graph optimisations, idle workers not spinning), so the two differ in the server only.
SIGTERM or SIGINT stops Triton and removes PyTriton's workspace.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sysconfig
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefer_own_libpython() -> None:
    """Put this interpreter's libpython first on the library path of Triton's children.

    Triton's python-backend stub (the process that relays requests to this one) links
    ``libpython3.X.so.1.0`` by name; without this it finds the system's copy of that name (Debian's
    build) instead of the one this interpreter was built with, and the stub fails to start. PyTriton
    copies this process's environment into the server's, so setting it here reaches the stub."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        rest = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = libdir + (":" + rest if rest else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="the model.onnx the committee store serves")
    parser.add_argument("--model", required=True, help="the model's name under /v2/models/")
    parser.add_argument("--input", default="input", help="the ONNX input name (the v2 request's tensor name)")
    parser.add_argument("--output", default="logits", help="the ONNX output name")
    parser.add_argument("--port", type=int, required=True, help="Triton's HTTP port on 127.0.0.1")
    parser.add_argument("--max-batch-size", type=int, default=32, help="images per batch at most (committee-serve's default)")
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="wait for a batch to fill at most this long (committee-serve's default: 0)")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads, 0 = its default")
    args = parser.parse_args()

    prefer_own_libpython()
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.intra_op_threads:
        options.intra_op_num_threads = args.intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    spec = next(i for i in session.get_inputs() if i.name == args.input)
    per_image = [int(d) for d in spec.shape[1:]]  # the batch axis is Triton's
    classes = next(o for o in session.get_outputs() if o.name == args.output).shape[1:]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {args.output: session.run([args.output], {args.input: inputs[args.input]})[0]}

    # SIGTERM as SIGINT: PyTriton's serve() stops Triton and cleans its workspace on KeyboardInterrupt only.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1", grpc_port=free_port(),
                          metrics_port=free_port(), log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name=args.model, infer_func=infer,
                    inputs=[Tensor(name=args.input, dtype=np.float32, shape=tuple(per_image))],
                    outputs=[Tensor(name=args.output, dtype=np.float32, shape=tuple(int(d) for d in classes))],
                    config=ModelConfig(max_batch_size=args.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
                    strict=True)
        triton.serve()


if __name__ == "__main__":
    main()
