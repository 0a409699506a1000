"""The torch V7 rule equals sedac_core on the same similarity matrix."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sedac_core
from sedac_monitor.decide import MonitorDecider, similarity

values = st.sampled_from([0.0, 0.5, 0.89, 0.9, 0.91, 0.97, 0.98, 0.99, 1.0, float("nan")])


@st.composite
def cases(draw):
    layers = draw(st.integers(1, 10))
    tokens = draw(st.integers(0, 12))
    sim = np.array(draw(st.lists(st.lists(values, min_size=layers, max_size=layers), min_size=tokens,
                                 max_size=tokens)), dtype=np.float32).reshape(tokens, layers)
    tau = draw(st.sampled_from([0.9, 0.98, 0.99, 1.0, 1.5, 0.0]))
    k = draw(st.integers(1, 4))
    min_layer = draw(st.integers(0, layers))
    protect = draw(st.integers(0, layers))
    return sim, tau, k, min_layer, protect


def run_decider(sim, rule):
    n, layers = sim.shape
    d = MonitorDecider(rule, layers)
    state = {"run": torch.zeros(n, dtype=torch.int32), "exited": torch.zeros(n, dtype=torch.bool)}
    exit_layer = torch.full((n,), -1, dtype=torch.int32)
    skipped = np.zeros(n, dtype=np.int64)
    for layer in range(layers):
        skip, keep = d.plan(layer, state)
        assert keep is None
        if skip is not None:
            skipped += skip.numpy()
        run, exited = d.advance(layer, torch.from_numpy(sim[:, layer]), state["run"], state["exited"])
        exit_layer = exit_layer.masked_fill(exited & ~state["exited"], layer)
        state = {"run": run, "exited": exited}
    return exit_layer.numpy(), skipped


@settings(max_examples=300, deadline=None)
@given(cases())
def test_cascade_exits_equal_consecutive_exit(case):
    sim, tau, k, min_layer, protect = case
    rule = sedac_core.MonitorRule(tau, k, min_layer, protect, "cascade")
    exits, skipped = run_decider(sim, rule)
    np.testing.assert_array_equal(exits, sedac_core.consecutive_exit(sim, tau, k, min_layer))
    table = sedac_core.replay(sedac_core.Trace.similarity(sim, protect_last=protect), [rule]) if sim.shape[0] else None
    if table is not None:
        assert int(table["skipped_layers"][0]) == int(skipped.sum())
        assert int(table["exits"][0]) == int((skipped > 0).sum())


@settings(max_examples=300, deadline=None)
@given(cases())
def test_per_layer_skips_equal_replay(case):
    sim, tau, k, min_layer, protect = case
    if sim.shape[0] == 0:
        return
    rule = sedac_core.MonitorRule(tau, k, min_layer, protect, "per_layer")
    _, skipped = run_decider(sim, rule)
    table = sedac_core.replay(sedac_core.Trace.similarity(sim, protect_last=protect), [rule])
    assert int(table["skipped_layers"][0]) == int(skipped.sum())
    assert int(table["exits"][0]) == int((skipped > 0).sum())


def test_similarity_is_half_cosine_plus_half():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [0.0, 3.0]])
    torch.testing.assert_close(similarity(a, b), torch.tensor([1.0, 0.0, 0.5]))


def test_decider_rejects_bad_arguments():
    import pytest

    with pytest.raises(TypeError, match="sedac_core.MonitorRule"):
        MonitorDecider({"tau": 0.9}, 4)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        MonitorDecider(sedac_core.MonitorRule(0.9), 0)


def test_every_decider_follows_one_protocol():
    """The HF hooks and vLLM's compiled forward drive deciders the same way (start / step / plan, the state
    kept by the caller); a decider that does not declare the protocol is refused with a clear error."""
    import pytest

    from sedac_monitor.api import Decider, ForcedExitDecider, RecordingDecider, SkipRuntime

    rule = sedac_core.MonitorRule(0.9, 1, 1, 0, "cascade")
    for d in (MonitorDecider(rule, 4), RecordingDecider(4), ForcedExitDecider(4, 1)):
        assert isinstance(d, Decider), type(d).__name__

    class Stateful:  # the pre-protocol shape: begin / plan(layer) / after_layer
        def begin(self, stream): ...

        def plan(self, layer): ...

        def after_layer(self, layer, stream): ...

    with pytest.raises(TypeError, match="Stateful is not a decider.*start\\(stream\\)"):
        SkipRuntime(Stateful(), 4)

    # driven by the runtime (HF hooks) or by hand (as vLLM's graph does): the same plans
    torch.manual_seed(0)
    streams = [torch.randn(5, 8)]
    for _ in range(4):
        streams.append(streams[-1] + 0.05 * torch.randn(5, 8))
    d = MonitorDecider(rule, 4)
    rt = SkipRuntime(d, 4, protect_first=0)
    rt.begin(streams[0])
    state = d.start(streams[0])
    for layer in range(4):
        a, b = d.plan(layer, rt.state), d.plan(layer, state)
        assert (a[0] is None) == (b[0] is None) and (a[0] is None or torch.equal(a[0], b[0]))
        rt.after_layer(layer, streams[layer + 1])
        state = d.step(layer, streams[layer + 1], state)
    assert bool(state["exited"].any())  # the case exercises exits


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from([0.9, 0.99, 0.999, 0.0]), st.integers(1, 3),
       st.integers(0, 8), st.integers(0, 8), st.sampled_from(["cascade", "per_layer"]), st.integers(0, 2**16))
def test_stepping_only_the_step_layers_gives_the_same_plans(layers, rows, tau, k, min_layer, protect, scope, seed):
    min_layer, protect = min(min_layer, layers), min(protect, layers)
    rule = sedac_core.MonitorRule(tau, k, min_layer, protect, scope)
    d = MonitorDecider(rule, layers)
    g = torch.Generator().manual_seed(seed)
    streams = [torch.randn(rows, 8, generator=g)]
    for _ in range(layers):  # small steps for some rows (similar streams: exits), large for the others
        scale = torch.where(torch.rand(rows, 1, generator=g) < 0.6, 0.01, 1.0)
        streams.append(streams[-1] + scale * torch.randn(rows, 8, generator=g))
    every, some = d.start(streams[0]), d.start(streams[0])
    for layer in range(layers):
        a, b = d.plan(layer, every)[0], d.plan(layer, some)[0]
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), layer
        every = d.step(layer, streams[layer + 1], every)
        if layer in d.step_layers:
            some = d.step(layer, streams[layer + 1], some)
    assert all(0 <= layer < layers for layer in d.step_layers)
