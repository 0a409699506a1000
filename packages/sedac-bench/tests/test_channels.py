"""The channel soft exit benchmark's building blocks on a tiny model and constructed cases: what the masks
count, what the baselines zero, the target's verdict, and the report section and plot."""

import pytest
import torch

from sedac_bench import channels, plots, report
from sedac_monitor.api import channel_importance, find_layout, teacher_forced
from sedac_monitor.testing import tiny_model


def _layout():
    model = tiny_model("llama")
    return model, find_layout(model)


def test_masks_count_entries_and_columns_every_row_of_a_group_skips():
    model, layout = _layout()
    L = layout.num_layers
    every = (lambda i, x: torch.ones_like(x, dtype=torch.bool)), (lambda i, h: None)
    ids = torch.arange(3, 3 + 2 * channels.UNION_ROWS).view(2, -1)
    with torch.no_grad(), channels.masked(layout, *every) as counts:
        model(input_ids=ids)
    s_in, s_mid = counts.sparsity()
    assert s_in == [1.0] * L and s_mid == [0.0] * L
    assert counts.union[("input", 0)][1] == counts.union[("input", 0)][0]  # every column skipped by every row
    # a column one row of the group still needs is read for the whole group
    half = (lambda i, x: torch.arange(x.shape[-2]).view(-1, 1).expand(x.shape) % 2 == 0), (lambda i, h: None)
    with torch.no_grad(), channels.masked(layout, *half) as counts:
        model(input_ids=ids)
    assert counts.sparsity()[0][0] == 0.5 and counts.union[("input", 0)][1] == 0


def test_baselines_zero_what_they_claim():
    model, layout = _layout()
    x = torch.randn(64, layout.hidden_size)
    mask_in, mask_mid = channels.random_channels([0.3] * layout.num_layers, [0.0] * layout.num_layers)
    assert abs(float(mask_in(0, x).float().mean()) - 0.3) < 0.05 and mask_mid(0, x) is None
    _, static = channels.static_order(layout, 0.25)
    h = torch.randn(5, layout.mlp(0).down_proj.weight.shape[1])
    dropped = static(0, h)[0]
    imp = channel_importance(layout.mlp(0))
    assert float(dropped.float().mean()) == 0.25
    assert imp[dropped].max() <= imp[~dropped].min()  # the least important channels go first


def test_rows_count_work_and_the_target_judges_the_calibrated_row(tmp_path):
    model, layout = _layout()
    windows = torch.randint(3, 300, (2, 40))
    base = teacher_forced(layout, windows, None, 2)
    row = channels.measure(layout, windows, base, "half the input", "calibrated",
                           channels.random_channels([0.5] * layout.num_layers, [0.5] * layout.num_layers))
    assert 0.4 < row["mlp_flops_saved"] < 0.6 and row["weight_bytes_saved_b1"] == row["mlp_flops_saved"]
    assert row["weight_bytes_saved_b16"] < 0.01  # random entries: no column is skipped by 16 rows at once
    assert row["risk"] > 0
    good = {"variant": "calibrated", "mlp_flops_saved": 0.18, "risk": 0.03, "delta_ppl": 0.01}
    uniform = [{"variant": "uniform", "mlp_flops_saved": 0.15, "risk": 0.02},
               {"variant": "uniform", "mlp_flops_saved": 0.20, "risk": 0.06}]
    worse = [{"variant": "random", "risk": 0.2}, *uniform]
    t = channels.targets([good, *worse])
    assert t["met"] and abs(t["risk_at_same_work"]["uniform"] - 0.044) < 1e-9  # read between 15% and 20%
    t = channels.targets([{**good, "risk": 0.06}, *worse])
    assert not t["within_budget"] and not t["met"]
    t = channels.targets([{**good, "risk": 0.045}, *worse])
    assert t["within_budget"] and t["work_met"] and not t["beats_on_risk"]["uniform"] and not t["met"]
    t = channels.targets([good, worse[0], uniform[0]])  # no uniform point at or above its work: not compared
    assert t["risk_at_same_work"]["uniform"] is None and not t["met"]
    assert channels.at_work(uniform, 0.15) == 0.02 and channels.at_work(uniform, 0.3) is None
    assert channels.targets([])["met"] is False
    results = {"machine": {"processor": "x", "cpu_count": 2}, "command": "test",
               "quality": {"rows": [], "best_sedac": None},
               "channels": {"config": {"max_risk": 0.05, "max_delta_ppl": 0.02, "status": "ok"},
                            "rows": [{**row, "variant": "calibrated"}], "curves": {},
                            "targets": channels.targets([{**row, "variant": "calibrated"}]), "union_rows": 16}}
    text = "\n".join(report.channel_section(results))
    assert "| half the input |" in text and "Overall: **not met**" in text
    assert plots.channel_pareto(results, tmp_path) == ["pareto_channels.png"]
    assert (tmp_path / "pareto_channels.png").stat().st_size > 0


def test_vllm_serves_the_channel_setting_only_when_one_met_the_budget(tmp_path):
    from sedac_bench.run import SIZES
    from sedac_bench.vllm_compare import CHANNELS, VllmStages

    stages = VllmStages()
    stages.out, stages.size = tmp_path, SIZES["quick"]
    stages.results = {"channels": {"config": {"status": "no channel sparsity met the budget"}}}
    assert CHANNELS not in [c["name"] for c in stages.vllm_configs()]
    stages.results = {"channels": {"config": {"status": "ok", "channels": {}}}}
    served = {c["name"]: c for c in stages.vllm_configs()}
    assert served[CHANNELS]["env"]["SEDAC_CONFIG"] == str(tmp_path / "sedac_channels_config.json")


def test_fixed_sparsity_is_measured_on_both_sides_of_the_work():
    levels = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    measured = []

    def level_row(level):  # a level saves a little less work than its level, as measured
        measured.append(level)
        return {"mlp_flops_saved": 0.967 * level, "risk": level / 3}

    rows = channels.bracket(levels, 0.1458, level_row)
    assert measured == [0.1, 0.15, 0.2]  # 15% saves 14.50%: one more level above
    assert channels.at_work(rows, 0.1458) is not None
    measured.clear()
    rows = channels.bracket(levels, 0.12, level_row)
    assert measured == [0.1, 0.15] and channels.at_work(rows, 0.12) is not None
    measured.clear()
    assert len(channels.bracket(levels, 0.9, level_row)) == 1 and measured == [0.3]  # beyond the last level


def test_bracket_needs_a_level_to_measure():
    with pytest.raises(ValueError, match="at least one sparsity level"):
        channels.bracket([0.0], 0.1, lambda level: {"mlp_flops_saved": level})
