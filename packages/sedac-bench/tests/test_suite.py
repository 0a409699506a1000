"""Parts of the test suite that need no real model."""

import torch

from sedac_bench.suite import THRESHOLDS, paraphrase, robustness
from sedac_monitor.api import find_layout, load_model
from sedac_monitor.testing import tiny_model

TEXT = " ".join(f"The mill and the river said {i} things, but the baker and the miller said more." for i in range(80))


def test_paraphrase_is_light_and_deterministic():
    p = paraphrase(TEXT)
    assert p == paraphrase(TEXT) and p != TEXT
    assert "That mill" in p and "stated" in p and "as well as" in p
    assert abs(len(p) - len(TEXT)) < 0.05 * len(TEXT)


def test_robustness_counts_consistent_decisions(tmp_path):
    tiny_model("llama", tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    layout = find_layout(model)
    never = {"tau": 1.5, "consecutive_k": 1, "min_layer": 0, "protect_last": 0, "scope": "cascade"}
    r = robustness(layout, tok, TEXT, never, windows=3, length=128)
    assert r["rebatch_consistency"] == 1.0 and r["paraphrase_consistency"] == 1.0
    assert r["rebatch_tokens"] == (128 + 91 + 54) + (54 + 91) and r["paraphrase_tokens"] > 100
    some = {**never, "tau": 0.9, "min_layer": 1}
    r = robustness(layout, tok, TEXT, some, windows=3, length=128)
    assert 0.5 < r["rebatch_consistency"] <= 1.0 and 0 < r["paraphrase_consistency"] <= 1.0
    assert THRESHOLDS["consistency"] == 0.90


class BatchDependent:
    """A deliberately wrong rule: a row skips while its stream norm is above the batch's median, so its
    decisions depend on its neighbours."""

    monotone = False
    wants_positions = False
    step_layers = None

    def start(self, stream):
        return torch.zeros(stream.shape[0], dtype=torch.bool)

    def step(self, layer, stream, state):
        n = stream.float().norm(dim=-1)
        return n > n.median()

    def plan(self, layer, state):
        return (state, None) if layer >= 2 else (None, None)


def test_the_rebatching_check_fails_a_batch_dependent_rule(tmp_path):
    tiny_model("llama", tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    layout = find_layout(model)
    cfg = {"tau": 0.9, "consecutive_k": 1, "min_layer": 1, "protect_last": 0, "scope": "cascade"}
    honest = robustness(layout, tok, TEXT, cfg, windows=3, length=128)
    wrong = robustness(layout, tok, TEXT, cfg, windows=3, length=128, make_decider=BatchDependent)
    assert honest["rebatch_consistency"] > THRESHOLDS["consistency"]
    assert wrong["rebatch_consistency"] < THRESHOLDS["consistency"], wrong
