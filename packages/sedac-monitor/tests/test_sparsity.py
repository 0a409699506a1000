"""Channel soft exit (sedac_monitor.sparsity): per-token magnitude thresholds on the MLP's input and the down
projection's input, their calibration within the budget, the config round trip and the HF accelerator."""

import json

import pytest
import torch
import torch.nn.functional as F

from sedac_monitor import create_universal_accelerator, load_config
from sedac_monitor.api import InputError, load_model, read_text, token_windows
from sedac_monitor.calibrate import CHANNELS_NOT_MET, calibrate
from sedac_monitor.cli import main
from sedac_monitor.layouts import find_layout
from sedac_monitor.sparsity import (
    LEVELS,
    SIGNAL_CLAMP,
    ChannelSparsity,
    attach_channels,
    greedy_path,
    measure_channels,
    record,
    sparsity_at,
    token_scale,
    uniform,
)
from sedac_monitor.teacher import teacher_forced

TEXT = "\n\n".join(f"Record {i}: rivers carry {i % 13} stones past {i * 3} old mills, and the miller counts them."
                   for i in range(300))
OTHER = "\n\n".join(f"Note {i}: the {i % 7} lanterns by gate {i * 5} burn until the keeper sleeps at dawn."
                    for i in range(300))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def other_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "other.txt"
    p.write_text(OTHER)
    return p


def _sparsity(L, t_in, t_mid, weight=0.0, ref=()):
    return ChannelSparsity((t_in,) * L, (t_mid,) * L, (0.1,) * L, (0.1,) * L, weight, ref)


def _by_hand(mlp, x, t_in, t_mid, scale=None):
    s = 1.0 if scale is None else scale[..., None]
    xs = x.masked_fill(x.abs() < t_in * s, 0)
    h = F.silu(F.linear(xs, mlp.gate_proj.weight)) * F.linear(xs, mlp.up_proj.weight)
    return F.linear(h.masked_fill(h.abs() < t_mid * s, 0), mlp.down_proj.weight)


def test_thresholds_zero_the_small_entries_of_both_inputs_and_nothing_else(tiny):
    layout = find_layout(tiny)
    mlp = layout.mlp(1)
    x = torch.randn(2, 5, layout.hidden_size, generator=torch.Generator().manual_seed(0))
    dense = mlp(x)
    with torch.no_grad(), attach_channels(layout, _sparsity(layout.num_layers, 0.5, 0.05)) as att:
        masked = mlp(x)
    assert torch.allclose(masked, _by_hand(mlp, x, 0.5, 0.05), atol=1e-6)
    assert not torch.allclose(masked, dense, atol=1e-4)
    s_in, _ = att.counts.sparsity()
    assert s_in[1] == pytest.approx(float((x.abs() < 0.5).float().mean()))
    assert torch.equal(mlp(x), dense)  # leaving removes every hook


def test_zero_thresholds_are_the_dense_model(tiny):
    layout = find_layout(tiny)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        ref = tiny(input_ids=ids).logits
        with attach_channels(layout, _sparsity(layout.num_layers, 0.0, 0.0)) as att:
            out = tiny(input_ids=ids).logits
    assert torch.equal(ref, out) and att.counts.mlp_work_saved() == 0.0


def test_each_token_chooses_its_own_channels_and_shards_agree(tiny):
    """Thresholds are elementwise: a row's output does not depend on the other rows of the batch, and the mask
    of one tensor-parallel shard of the intermediate is that shard of the whole mask (top-k would not be)."""
    layout = find_layout(tiny)
    mlp = layout.mlp(2)
    x = torch.randn(6, layout.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attach_channels(layout, _sparsity(layout.num_layers, 0.3, 0.02)):
        alone = torch.cat([mlp(x[i:i + 1]) for i in range(6)])
        batched = mlp(x)
    assert torch.allclose(alone, batched, rtol=1e-4, atol=1e-4)  # GEMM order differs with the row count
    h = torch.randn(4, 30)
    whole = h.abs() < 0.4
    assert all(torch.equal(whole[:, k:k + 10], h[:, k:k + 10].abs() < 0.4) for k in (0, 10, 20))


def test_the_signal_raises_settled_tokens_thresholds(tiny):
    d = torch.tensor([1e-9, 0.01, 0.1, 1.0, 100.0])
    s = token_scale(d, 0.1, 1.0)
    assert s[2] == 1.0 and torch.all(s[:-1] >= s[1:])  # less movement, larger threshold
    assert s.max() == SIGNAL_CLAMP[1] and s.min() == SIGNAL_CLAMP[0]
    assert torch.all(token_scale(d, 0.1, 0.0) == 1.0)
    # in the model: per-token thresholds from the stream's movement through the previous layer
    layout = find_layout(tiny)
    L = layout.num_layers
    ids = torch.arange(3, 30).unsqueeze(0)
    seen = {}
    layout.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__(2, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
    layout.layers[3].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__(3, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
    mlp_in = {}
    layout.mlp(3).register_forward_pre_hook(lambda m, a: mlp_in.__setitem__(3, a[0].detach()))
    ref = tuple([1.0] + [0.05] * (L - 1))
    sp = _sparsity(L, 0.4, 0.03, 1.0, ref)
    out = {}
    layout.mlp(3).register_forward_hook(lambda m, a, o: out.__setitem__(3, o.detach()))
    with torch.no_grad(), attach_channels(layout, sp):
        tiny(input_ids=ids)
    d = 1 - F.cosine_similarity(seen[3].reshape(-1, seen[3].shape[-1]), seen[2].reshape(-1, seen[2].shape[-1]), -1)
    scale = token_scale(d, 0.05, 1.0).view(1, -1)
    assert not torch.all(scale == 1.0)
    # mlp_in was recorded before the channel hooks masked it (the MLP's own pre-hook runs first)
    assert torch.allclose(out[3], _by_hand(layout.mlp(3), mlp_in[3], 0.4, 0.03, scale), atol=1e-5)


def test_channels_validation_names_the_key():
    good = {"input_thresholds": [0.1, 0.2], "inner_thresholds": [0.0, 0.1], "input_sparsity": [0.1, 0.1],
            "inner_sparsity": [0.0, 0.2]}
    assert ChannelSparsity.from_json(good, 2).num_layers == 2
    bad = [
        ("not a dict", "channels must be an object"),
        ({**good, "extra": 1}, "unknown keys ['extra']"),
        ({**good, "input_thresholds": "0.1"}, "channels.input_thresholds must be a list"),
        ({**good, "inner_thresholds": [0.1]}, "channels.inner_thresholds has 1 entries"),
        ({**good, "input_thresholds": [0.1, -1]}, "channels.input_thresholds[1] must be a finite number >= 0"),
        ({**good, "input_thresholds": [0.1, float("nan")]}, "must be a finite number"),
        ({**good, "inner_sparsity": [0.0, 1.5]}, "channels.inner_sparsity[1] must be a fraction"),
        ({**good, "signal_weight": -1}, "channels.signal_weight must be a finite number >= 0"),
        ({**good, "signal_weight": 1.0}, "channels.signal_reference has 0 entries"),
        ({**good, "signal_weight": 1.0, "signal_reference": [1.0, 0.0]}, "channels.signal_reference[1] must be"),
    ]
    for data, message in bad:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ChannelSparsity.from_json(data, 2)
    with pytest.raises(InputError, match="thresholds for 2 layers, the model has 3"):
        ChannelSparsity.from_json(good, 3)
    # a config file with a broken channels object names the file and the key
    cfg = {"tau": 1.5, "consecutive_k": 1, "min_layer": 0, "protect_last": 0, "scope": "cascade",
           "channels": {**good, "input_thresholds": [0.1]}}
    with pytest.raises(InputError, match="config: channels.inner_thresholds has 2 entries"):
        load_config(cfg, 2)


def test_greedy_path_takes_the_cheapest_error_first():
    flat = [0.0] * len(LEVELS)
    steep = [float(k) for k in range(len(LEVELS))]
    path = greedy_path([steep, flat], [steep, steep], max_work=0.05)
    a, b = path[1]
    assert a == (0, 1) and b == (0, 0)  # layer 1's input costs nothing: it goes first
    works = [sum(x) for x, _ in path]
    assert works == sorted(works)


def test_levels_are_the_fraction_zeroed_with_or_without_the_signal(tiny_dir, text_file):
    model, tok = load_model(tiny_dir / "llama")
    layout = find_layout(model)
    windows = token_windows(tok, read_text(text_file), 128, 4)
    rec = record(layout, windows, 2, rows_per_layer=256, every=1)
    for weight in (0.0, 1.0):
        sp = sparsity_at(rec, ((LEVELS.index(0.3),) * layout.num_layers, (LEVELS.index(0.5),) * layout.num_layers),
                         weight)
        with torch.no_grad(), attach_channels(layout, sp) as att:
            model(input_ids=windows, use_cache=False)
        s_in, s_mid = att.counts.sparsity()
        # layer 0 has no signal; the recorded stream of every later layer moved with the masks, so close, not equal
        assert abs(s_in[0] - 0.3) < 0.02 and abs(s_mid[0] - 0.5) < 0.02
        assert all(abs(v - 0.3) < 0.1 for v in s_in) and all(abs(v - 0.5) < 0.1 for v in s_mid)
    assert uniform(rec, 0.3, 0.5).input_sparsity == (0.3,) * layout.num_layers
    with pytest.raises(InputError, match="multiples of 0.05"):
        uniform(rec, 0.33, 0.5)


@pytest.fixture(scope="module")
def channel_cfg(tiny_dir, text_file):
    return calibrate(tiny_dir / "llama", text_file, max_risk=0.2, max_delta_ppl=0.05, tokens=1024, max_length=128,
                     budget=5, channels=True, log=lambda m: None)


def test_calibration_spends_the_budget_on_channels(channel_cfg, tiny_dir, text_file, other_file):
    cfg = channel_cfg
    assert cfg["status"] == "ok" and cfg["tau"] > 1  # exits off: the budget went to channels
    ev = cfg["evidence"]
    chosen = ev["chosen"]
    assert chosen["measured_risk"] <= 0.2 and chosen["delta_ppl"] <= 0.05 and chosen["mlp_work_saved"] > 0
    passing = [m for m in ev["measured"] if m["passes"]]
    assert chosen["mlp_work_saved"] == max(m["mlp_work_saved"] for m in passing)
    assert all(not m["passes"] for m in ev["measured"]
               if m["measured_risk"] > 0.2 or m["delta_ppl"] > 0.05)
    # the config re-measured through the accelerator gives the evidence's numbers
    model, tok = load_model(tiny_dir / "llama")
    layout = find_layout(model)
    windows = token_windows(tok, read_text(text_file), 128, 8)
    base = teacher_forced(layout, windows, None, 4)
    acc = create_universal_accelerator(model, config=cfg)
    with acc:
        run = teacher_forced(layout, windows, None, 4)
    assert int((run.top1 != base.top1).sum()) == chosen["errors"]
    assert acc.channel_stats["mlp_work_saved"] == pytest.approx(chosen["mlp_work_saved"], rel=0.02)
    assert acc.stats["skipped_mlp_fraction"] == 0.0
    # and on text it never saw, the same thresholds still zero a similar share
    held = measure_channels(layout, token_windows(tok, read_text(other_file), 128, 8),
                            ChannelSparsity.from_json(cfg["channels"]), base.top1 * 0, base.nll)
    assert abs(held["mlp_work_saved"] - chosen["mlp_work_saved"]) < 0.1


def test_no_channel_setting_within_budget_computes_every_channel(tiny_dir, text_file):
    cfg = calibrate(tiny_dir / "qwen2", text_file, max_risk=0.0, max_delta_ppl=0.0, tokens=512, max_length=128,
                    budget=2, channels=True, log=lambda m: None)
    assert cfg["status"] == CHANNELS_NOT_MET and "channels" not in cfg and cfg["tau"] > 1
    assert "looser" in cfg["evidence"]["recommendation"]


def test_cli_channels_round_trip(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "cfg.json"
    assert main(["calibrate", "--model", str(tiny_dir / "qwen2"), "--text", str(text_file), "--tokens", "512",
                 "--max-length", "128", "--max-risk", "0.3", "--max-delta-ppl", "0.1", "--budget", "3",
                 "--channels", "--signal-weight", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cfg = json.loads(out.read_text())
    assert f"wrote {out}" in printed and "channel soft exit: MLP work saved" in printed
    assert cfg["channels"]["signal_weight"] == 0.5 and len(cfg["channels"]["signal_reference"]) == 6
    res = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_dir / "qwen2"), "--config", str(out), "--text", str(text_file),
                 "--tokens", "256", "--max-length", "128", "--json", str(res)]) == 0
    assert "channel soft exit saved" in capsys.readouterr().out
    assert json.loads(res.read_text())["config"]["channel_mlp_work_saved"] > 0
    with pytest.raises(SystemExit):
        main(["calibrate", "--model", "m", "--text", "t", "--signal-weight", "1"])
    assert "--signal-weight applies to channel soft exit: add --channels" in capsys.readouterr().err
