"""V6 probes on a CUDA GPU through the Hugging Face accelerator: the same per-token decisions as on the CPU
(threshold rule, and confidence accumulation with soft exit). Run by ``nox -s tests_gpu``; it fails, never
skips, where CUDA is missing."""

import copy

import pytest
import torch

from sedac_monitor.attach import HFAttachment
from sedac_monitor.engine import SkipRuntime
from sedac_monitor.layouts import find_layout
from sedac_monitor.testing import tiny_model
from sedac_probes import LREProbe, ProbeBank, ProbeDecider, TorchProbeRule

DEVICE = "cuda"
LAYERS = (1, 3)


def bank_for(hidden):
    torch.manual_seed(1)
    probes = {layer: LREProbe(hidden, 8, "safety") for layer in LAYERS}
    for p in probes.values():
        torch.nn.init.normal_(p.norm.weight)
        torch.nn.init.normal_(p.norm.bias)
    return ProbeBank.from_probes(probes).eval()


def gap(values, q):
    """The middle of the widest gap between sorted values near their q-quantile: no value lies close."""
    v = values.flatten().sort().values
    centre = torch.quantile(v, q)
    score = (v[1:] - v[:-1]) / (1 + 20 * ((v[1:] + v[:-1]) / 2 - centre).abs())
    i = int(score.argmax())
    return float((v[i] + v[i + 1]) / 2)


def run(model, bank, x, thresholds, rule, soft, device):
    layout = find_layout(model)
    L = layout.num_layers
    decider = ProbeDecider(bank, TorchProbeRule(thresholds, rule, exit_rates=[0.5, 0.5], weights=[0.5, 0.5],
                                              soft_exit=soft, device=torch.device(device)), L)
    runtime = SkipRuntime(decider, L)
    att = HFAttachment(layout, runtime, soft_exit=soft)
    try:
        with torch.no_grad():
            logits = model(input_ids=x.to(device)).logits.float().cpu()
    finally:
        att.detach()
    return logits, runtime.last_first_skip.cpu(), runtime.stats.as_dict()


def test_a_cuda_device_is_there():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("rule,soft", [("threshold", False), ("confidence", True)])
def test_cuda_probe_decisions_equal_the_cpus(rule, soft):
    cpu = tiny_model("llama")
    gpu = copy.deepcopy(cpu).to(DEVICE)
    bank = bank_for(cpu.config.hidden_size)
    x = torch.randint(3, 384, (2, 40), generator=torch.Generator().manual_seed(0))
    # thresholds in gaps of the CPU's risks at each checkpoint, so float differences cannot flip a decision
    layout = find_layout(cpu)
    streams = {}
    hooks = [layout.layers[layer].register_forward_hook(
        lambda m, a, out, layer=layer: streams.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)))
        for layer in LAYERS]
    with torch.no_grad():
        cpu(input_ids=x)
    for h in hooks:
        h.remove()
    thresholds = [gap(bank.risk_at(i, streams[layer].reshape(-1, streams[layer].shape[-1])), 0.4)
                  for i, layer in enumerate(LAYERS)]
    lc, fc, sc = run(cpu, bank, x, thresholds, rule, soft, "cpu")
    lg, fg, sg = run(gpu, copy.deepcopy(bank).to(DEVICE), x, thresholds, rule, soft, DEVICE)
    assert 0 < sc["skipped_mlp_fraction"] < 1, "the test needs some exits"
    assert torch.equal(fc, fg), "per-token first skipped layer differs between CPU and CUDA"
    assert sg["skipped_mlp_fraction"] == pytest.approx(sc["skipped_mlp_fraction"], abs=1e-9)
    torch.testing.assert_close(lg, lc, atol=1e-3, rtol=1e-3)
