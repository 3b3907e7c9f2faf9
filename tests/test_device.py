"""Training's device choice: the CPU fallback here, and the CUDA path where a GPU is present."""

import logging

import numpy as np
import pytest
import torch

from training.device import resolve_device
from training.evaluate import predict_logits
from training.inputs import Images, input_spec
from training.members import build_member
from training.train import TrainConfig, fit

NO_CUDA = "torch sees no CUDA device on this machine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present, so there is no fallback to see")
def test_cuda_falls_back_to_the_cpu_with_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="training.device"):
        assert resolve_device("cuda").type == "cpu"
    assert "training on the CPU" in caplog.text
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_fit_on_cuda_keeps_data_on_the_device_and_matches_its_cpu_copy():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (512, 1, 16, 16), dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127).long()
    spec = input_spec(1, 16, [0.5], [0.25])
    model = build_member("committee_cnet", 2, 1).to(resolve_device("cuda"))
    fit(model, Images(x[:384], y[:384]), Images(x[384:], y[384:]), spec, TrainConfig(epochs=2, batch_size=64, augment=True), seed=0)
    on_gpu = predict_logits(model, x[384:], spec)
    on_cpu = predict_logits(model.cpu(), x[384:], spec)
    assert np.abs(on_gpu - on_cpu).max() < 0.1  # bf16 autocast on the GPU, fp32 on the CPU
