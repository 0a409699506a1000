"""Channel soft exit's MLP kernel (``sedac_core.gated_mlp``) against the masked dense MLP.

Property tests over shapes, thresholds (so sparsity patterns: none kept, some, all) and inputs with NaN and
infinities: the Rust kernel, which reads only the kept channels' weights, equals the numpy twin (the masked
dense MLP) and a float64 reference up to float rounding; it never reads a weight of a channel no row keeps;
bad arguments get the same error from both backends.
"""

import ctypes

import numpy as np
import pytest
from conftest import on_both
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sedac_core as sc

F32 = np.float32
entries = st.one_of(st.floats(-3, 3, width=32), st.sampled_from([0.0, np.nan, np.inf, -np.inf]))
tame = st.floats(-1, 1, width=32)


@st.composite
def case(draw, specials=True):
    rows, hidden, inter = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    x = draw(hnp.arrays(F32, (rows, hidden), elements=entries if specials else st.floats(-3, 3, width=32)))
    gate_up = draw(hnp.arrays(F32, (2 * inter, hidden), elements=tame))
    down = draw(hnp.arrays(F32, (hidden, inter), elements=tame))
    t_in = draw(st.sampled_from([0.0, 0.5, 1.5, 10.0]))
    t_mid = draw(st.sampled_from([0.0, 0.05, 0.3, 100.0]))
    return x, gate_up, down, t_in, t_mid


def reference(x, gate_up, down, t_in, t_mid):
    """The masked dense MLP in float64, with the inner mask taken on the float32 activation, and the terms'
    magnitudes (for the rounding tolerance)."""
    keep_in = ~(np.abs(x) < F32(t_in))
    xm = np.where(keep_in, x, 0).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        h = xm @ gate_up.T.astype(np.float64)
        inter = down.shape[1]
        g, u = h[:, :inter].astype(F32), h[:, inter:].astype(F32)
        a = (g / (F32(1) + np.exp(-g))) * u
        keep_mid = ~(np.abs(a) < F32(t_mid))
        am = np.where(keep_mid, a, 0).astype(np.float64)
        y = am @ down.T.astype(np.float64)
        scale = np.abs(am) @ np.abs(down.T.astype(np.float64)) + 1.0
        near = np.abs(np.abs(a) - F32(t_mid)) <= 1e-3 * (1.0 + np.abs(a))  # a mask rounding could flip
    return y, scale, keep_in, keep_mid, near


def run(backend, x, gate_up, down, t_in, t_mid):
    sc.set_backend(backend)
    gu, dn = sc.channel_major(gate_up, down)
    return sc.gated_mlp(x, gu, dn, t_in, t_mid)


@given(case())
def test_both_backends_equal_the_masked_dense_mlp(c):
    y, scale, keep_in, keep_mid, near = reference(*c)
    assume(c[4] == 0.0 or not near.any())
    previous = sc.backend()
    try:
        for backend in ("rust", "python"):
            got = run(backend, *c)
            assert got.out.shape == y.shape and got.out.dtype == F32
            assert got.kept_input == int(keep_in.any(axis=0).sum())
            assert got.kept_inner == int(keep_mid.any(axis=0).sum())
            np.testing.assert_array_equal(np.isnan(got.out), np.isnan(y), err_msg=backend)
            finite = np.isfinite(y) & np.isfinite(scale)
            assert np.all(np.abs(got.out[finite] - y[finite]) <= 1e-4 * scale[finite]), backend
            np.testing.assert_array_equal(got.out[~finite & ~np.isnan(y)], y[~finite & ~np.isnan(y)])
    finally:
        sc.set_backend(previous)


@given(case(specials=False), st.data())
def test_the_kernel_never_reads_a_channel_no_row_keeps(c, data):
    """Weights of channels no row keeps set to NaN: the dense MLP multiplies them by zero and turns NaN; the
    kernel never reads them, so its output is the one with finite weights."""
    x, gate_up, down, t_in, t_mid = c
    keep_in = ~(np.abs(x) < F32(t_in))
    assume(not keep_in.all())
    poisoned = gate_up.copy()
    poisoned[:, ~keep_in.any(axis=0)] = np.nan
    previous = sc.backend()
    try:
        clean, dirty = run("rust", x, gate_up, down, t_in, t_mid), run("rust", x, poisoned, down, t_in, t_mid)
    finally:
        sc.set_backend(previous)
    np.testing.assert_array_equal(clean.out, dirty.out)
    assert not np.isnan(dirty.out).any()


def test_the_masks_are_per_row_and_the_weights_read_are_their_union():
    # Row 0 keeps input channel 0, row 1 channel 2: two of three rows of gate_up are read, and each row's
    # output uses only its own kept entries.
    x = np.array([[2.0, 0.1, 0.0], [0.0, 0.1, -3.0]], F32)
    rng = np.random.default_rng(0)
    gate_up, down = rng.standard_normal((4, 3)).astype(F32), rng.standard_normal((3, 2)).astype(F32)
    gu, dn = sc.channel_major(gate_up, down)
    out = sc.gated_mlp(x, gu, dn, t_in=0.5)
    assert out.kept_input == 2
    for r in range(2):
        alone = sc.gated_mlp(x[r:r + 1], gu, dn, t_in=0.5)
        np.testing.assert_allclose(out.out[r], alone.out[0], rtol=1e-6)


def test_out_is_written_in_place(backend):
    gu, dn = sc.channel_major(np.ones((4, 3), F32), np.ones((3, 2), F32))
    buf = np.full((1, 3), np.nan, F32)
    got = sc.gated_mlp(np.ones((1, 3), F32), gu, dn, out=buf)
    assert got.out is buf and np.isfinite(buf).all()


GU, DN = sc.channel_major(np.ones((4, 3), F32), np.ones((3, 2), F32))
X = np.ones((2, 3), F32)
BAD_CALLS = {
    "gate_up in torch's layout": lambda: sc.gated_mlp(X, np.ones((4, 3), F32), DN),
    "gate_up not contiguous": lambda: sc.gated_mlp(X, np.asfortranarray(GU), DN),
    "gate_up float64": lambda: sc.gated_mlp(X, GU.astype(np.float64), DN),
    "down a list": lambda: sc.gated_mlp(X, GU, DN.tolist()),
    "down wrong hidden": lambda: sc.gated_mlp(X, GU, np.ones((2, 4), F32)),
    "x wrong hidden": lambda: sc.gated_mlp(np.ones((2, 4), F32), GU, DN),
    "negative threshold": lambda: sc.gated_mlp(X, GU, DN, t_in=-0.1),
    "nan threshold": lambda: sc.gated_mlp(X, GU, DN, t_mid=float("nan")),
    "out wrong shape": lambda: sc.gated_mlp(X, GU, DN, out=np.empty((1, 3), F32)),
    "channel_major odd shapes": lambda: sc.channel_major(np.ones((3, 3), F32), np.ones((3, 2), F32)),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_raises_the_same_error(name):
    results = on_both(BAD_CALLS[name])
    assert results["rust"][0] == "error", results
    assert results["rust"] == results["python"]


def test_a_weight_layout_error_says_how_to_make_the_right_one():
    with pytest.raises(ValueError, match=r"gate_up must be \[hidden, 2 \* inter\]"):
        sc.gated_mlp(X, np.ones((4, 3), F32), DN)
    with pytest.raises(TypeError, match="channel_major"):
        sc.gated_mlp(X, np.asfortranarray(GU), DN)


def test_channel_mlp_is_gated_mlp_with_the_checks_done_once(backend):
    rng = np.random.default_rng(1)
    gate_up, down = rng.standard_normal((10, 4)).astype(F32), rng.standard_normal((4, 5)).astype(F32)
    x = rng.standard_normal((3, 4)).astype(F32)
    mlp = sc.ChannelMlp(gate_up, down, 0.3, 0.2)
    assert (mlp.hidden, mlp.inter, mlp.nbytes) == (4, 5, 4 * (40 + 20))
    out = np.empty_like(x)
    kept = mlp(x, out)
    want = sc.gated_mlp(x, *sc.channel_major(gate_up, down), 0.3, 0.2)
    np.testing.assert_array_equal(out, want.out)
    assert kept == (want.kept_input, want.kept_inner)
    other = mlp.with_thresholds(0.0, 0.0)
    assert other.gate_up is mlp.gate_up and (other.t_in, other.t_mid) == (0.0, 0.0)
    np.testing.assert_allclose(other(x, out) and out, sc.gated_mlp(x, mlp.gate_up, mlp.down).out, rtol=1e-6)
    with pytest.raises(TypeError):  # nothing converted per call: a float64 input is refused, not copied
        mlp(x.astype(np.float64), out)
    with pytest.raises(ValueError):
        sc.ChannelMlp(gate_up, down, -1.0)


# A C `parallel_for` with torch's `torch_parallel_for` contract, written with ctypes: it runs the tasks one
# at a time in reverse order (the result must not depend on the order the tasks run in), or refuses.
_BODY = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_PARALLEL_FOR = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _BODY,
                                 ctypes.c_void_p)
_tasks_run = []


@_PARALLEL_FOR
def _reversed(begin, end, grain, body, ctx):
    for i in reversed(range(begin, end)):
        _tasks_run.append(i)
        body(i, i + 1, ctx)
    return 0


@_PARALLEL_FOR
def _refuses(begin, end, grain, body, ctx):
    return 3


def _address(fn):
    return ctypes.cast(fn, ctypes.c_void_p).value


@pytest.fixture
def rust_on_rayon_afterwards():
    previous = sc.backend()
    sc.set_backend("rust")
    yield
    sc.set_parallel_for(None)
    assert sc.parallel_for() == "rayon"
    sc.set_backend(previous)


def test_an_external_parallel_for_runs_the_tasks_with_the_same_result(rust_on_rayon_afterwards):
    rng = np.random.default_rng(2)
    gate_up, down = rng.standard_normal((2 * 700, 576)).astype(F32), rng.standard_normal((576, 700)).astype(F32)
    x = rng.standard_normal((2, 576)).astype(F32)
    gu, dn = sc.channel_major(gate_up, down)
    assert sc.parallel_for() == "rayon"
    want = sc.gated_mlp(x, gu, dn, 0.3, 0.1)
    sc.set_parallel_for(_address(_reversed))
    assert sc.parallel_for() == "external"
    _tasks_run.clear()
    got = sc.gated_mlp(x, gu, dn, 0.3, 0.1)
    # gate/up's kept input channels and down's kept channels, in chunks of 128: several tasks each
    assert len(_tasks_run) >= 4 and _tasks_run[0] > _tasks_run[1]
    np.testing.assert_array_equal(got.out, want.out)
    assert (got.kept_input, got.kept_inner) == (want.kept_input, want.kept_inner)


def test_a_failing_parallel_for_is_an_error(rust_on_rayon_afterwards):
    gu, dn = sc.channel_major(np.ones((4, 3), F32), np.ones((3, 2), F32))
    sc.set_parallel_for(_address(_refuses))
    with pytest.raises(RuntimeError, match=r"parallel_for failed \(error code 3\)"):
        sc.gated_mlp(np.ones((1, 3), F32), gu, dn)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "0x10"])
def test_set_parallel_for_takes_an_address_or_none(bad):
    with pytest.raises(ValueError, match="address must be None or a function's address"):
        sc.set_parallel_for(bad)


def test_the_numpy_backend_has_no_tasks_to_place(backend):
    sc.set_parallel_for(None)
    assert sc.parallel_for() == ("numpy" if backend == "python" else "rayon")
