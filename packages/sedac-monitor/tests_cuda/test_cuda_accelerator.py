"""The Hugging Face accelerator on a CUDA GPU: the same decisions as on the CPU, the same outputs within float
tolerance, the model restored exactly. Run by ``nox -s tests_gpu`` (not collected by ``nox -s tests``, which has
no GPU); it fails, never skips, where CUDA is missing."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from sedac_monitor import create_universal_accelerator
from sedac_monitor.testing import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "test_support"))
from sedac_fixtures import record_sims, tau_in_a_gap  # noqa: E402

DEVICE = "cuda"


def ids(batch, length, seed=0, vocab=384):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tau_between_similarities(model, x, quantile=0.4):
    """A tau in a wide gap of the CPU similarities, so float differences between the devices cannot flip a
    decision."""
    return tau_in_a_gap(record_sims(model, x), quantile)


def test_a_cuda_device_is_there():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("scope", ["cascade", "per_layer"])
def test_cuda_decides_as_the_cpu_does(family, scope):
    cpu = tiny_model(family)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x = ids(2, 48)
    tau = tau_between_similarities(cpu, x)
    runs = {}
    for name, model, inputs in (("cpu", cpu, x), ("cuda", gpu, x.to(DEVICE))):
        acc = create_universal_accelerator(model, tau=tau, consecutive_k=1, min_layer=1, scope=scope)
        with acc, torch.no_grad():
            logits = model(input_ids=inputs).logits
        runs[name] = (logits.float().cpu(), acc.runtime.last_first_skip.cpu(), acc.stats)
    (lc, fc, sc), (lg, fg, sg) = runs["cpu"], runs["cuda"]
    assert 0 < sc["skipped_mlp_fraction"] < 1, "the test needs some exits and some full rows"
    assert torch.equal(fc, fg), "per-token first skipped layer differs between CPU and CUDA"
    assert sg["skipped_mlp_fraction"] == sc["skipped_mlp_fraction"]
    assert sg["exit_layer_histogram"] == sc["exit_layer_histogram"]
    torch.testing.assert_close(lg, lc, atol=1e-3, rtol=1e-3)


def test_cuda_generate_and_restore():
    cpu = tiny_model("llama")
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x = ids(1, 24, seed=1)
    tau = tau_between_similarities(cpu, x)
    with torch.no_grad():
        plain = gpu(input_ids=x.to(DEVICE)).logits
    outs = {}
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        acc = create_universal_accelerator(model, tau=tau, consecutive_k=1, min_layer=1)
        with acc, torch.no_grad():
            out = model.generate(x.to(model.device), max_new_tokens=12, do_sample=False, pad_token_id=0)
        outs[name] = (out.cpu(), acc.stats["skipped_mlp_fraction"])
    assert outs["cpu"][1] > 0
    assert torch.equal(outs["cuda"][0], outs["cpu"][0])
    with torch.no_grad():
        after = gpu(input_ids=x.to(DEVICE)).logits
    assert torch.equal(after, plain), "leaving the context must restore the CUDA model exactly"
