"""The baseline: a hand-written FastAPI + ONNX Runtime server with no batching, JSON tensors only,
the way one would write it in an afternoon. Run: python -m benchmarks.naive_server STORE MODEL PORT."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from model_store import ModelStore


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class Request(BaseModel):
    inputs: list[Tensor]


def build(store: str, model: str) -> FastAPI:
    s = ModelStore(store)
    session = ort.InferenceSession(str(s.verify(s.resolve(model))), providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post(f"/v2/models/{model}/infer")
    def infer(request: Request) -> dict:
        x = np.asarray(request.inputs[0].data, dtype=np.float32).reshape(request.inputs[0].shape)
        logits = session.run(None, {"input": x})[0]
        return {"model_name": model, "outputs": [{"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
                                                  "data": logits.ravel().tolist()}]}

    return app


if __name__ == "__main__":
    store, model, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    uvicorn.run(build(store, model), host="127.0.0.1", port=port, log_level="warning", access_log=False)
