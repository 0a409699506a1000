"""create_universal_accelerator on tiny random Llama and Qwen2 models."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sedac_fixtures import record_sims, tau_in_a_gap

from sedac_monitor import UnsupportedModelError, create_universal_accelerator
from sedac_monitor.layouts import find_layout
from sedac_monitor.testing import tiny_model

G = torch.Generator().manual_seed(0)


def ids(batch=1, length=40, vocab=384):
    return torch.randint(3, vocab, (batch, length), generator=G)


def reference_forward(model, x, tau, k, min_layer, protect_last, scope):
    """Independent reference: the full MLP runs on every row, then the rows the V7 rule says are
    skipped (numpy bookkeeping, first token protected) are zeroed."""
    layout = find_layout(model)
    L = layout.num_layers
    n = x.numel()
    st = {}

    def begin(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        st.update(prev=h.reshape(n, -1), run=np.zeros(n, int), exit=np.full(n, -1), first=np.full(n, L))

    def after(i):
        def hook(module, args, out):
            h = (out[0] if isinstance(out, tuple) else out).reshape(n, -1)
            s = ((F.cosine_similarity(h.float(), st["prev"].float(), dim=-1, eps=1e-8) + 1) / 2).numpy()
            st["prev"] = h
            if i >= min_layer:
                st["run"] = np.where(s >= np.float32(tau), st["run"] + 1, 0)
                newly = (st["exit"] < 0) & (st["run"] >= k)
                st["exit"] = np.where(newly, i, st["exit"])
        return hook

    def mlp_hook(i):
        def hook(module, args, out):
            if i >= L - protect_last:
                return out
            if scope == "cascade":
                skip = (st["exit"] >= 0) & (st["exit"] < i)
            else:
                skip = st["run_before"] >= k
            skip = skip & (np.arange(n) % x.shape[1] != 0)  # the first token never exits
            st["first"] = np.where(skip & (st["first"] == L), i, st["first"])
            return out * torch.from_numpy(~skip).to(out.dtype).view(*out.shape[:-1], 1)
        return hook

    def snapshot(i):
        def hook(module, args):
            st["run_before"] = st["run"].copy()
        return hook

    handles = [layout.layers[0].register_forward_pre_hook(begin, with_kwargs=True)]
    for i, layer in enumerate(layout.layers):
        handles.append(layer.register_forward_hook(after(i)))
        handles.append(layer.mlp.register_forward_pre_hook(snapshot(i)))
        handles.append(layer.mlp.register_forward_hook(mlp_hook(i)))
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    return logits, st["first"]


def test_tau_above_one_is_bit_identical(tiny):
    x = ids(2, 33)
    with torch.no_grad():
        ref = tiny(input_ids=x).logits
        acc = create_universal_accelerator(tiny, tau=1.01, consecutive_k=1)
        with acc:
            out = tiny(input_ids=x).logits
            gen = tiny.generate(x[:1], max_new_tokens=6, do_sample=False)
        plain_gen = tiny.generate(x[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, out)
    assert torch.equal(gen, plain_gen)
    assert acc.stats["tokens"] == 66 + 33 + 5 and acc.stats["skipped_mlp_fraction"] == 0.0


@pytest.mark.parametrize("scope", ["cascade", "per_layer"])
@pytest.mark.parametrize("k,min_layer,protect_last", [(1, 0, 0), (2, 1, 1)])
def test_exits_equal_a_reference_that_zeroes_exited_rows(tiny, scope, k, min_layer, protect_last):
    x = ids(2, 48)
    tau = tau_in_a_gap(record_sims(tiny, x), 0.4)
    ref_logits, ref_first = reference_forward(tiny, x, tau, k, min_layer, protect_last, scope)
    acc = create_universal_accelerator(tiny, tau=tau, consecutive_k=k, min_layer=min_layer,
                                       protect_last=protect_last, scope=scope)
    with acc, torch.no_grad():
        out = tiny(input_ids=x).logits
    first = acc.runtime.last_first_skip.numpy()
    assert (first < find_layout(tiny).num_layers).any(), "the test needs some exits"
    np.testing.assert_array_equal(first, ref_first)
    torch.testing.assert_close(out, ref_logits, atol=2e-5, rtol=1e-5)
    stats = acc.stats
    assert stats["tokens"] == x.numel()
    assert 0 < stats["skipped_mlp_fraction"] < 1
    assert sum(stats["exit_layer_histogram"].values()) == x.numel()


def test_padded_batch_equals_one_prompt_at_a_time(tiny):
    lengths = [23, 40, 31]
    prompts = [ids(1, n)[0] for n in lengths]
    tau = tau_in_a_gap(torch.cat([record_sims(tiny, p[None]) for p in prompts]), 0.4)
    acc = create_universal_accelerator(tiny, tau=tau, consecutive_k=1, min_layer=1)
    singles, single_first = [], []
    with acc, torch.no_grad():
        for p in prompts:
            singles.append(tiny(input_ids=p[None]).logits[0])
            single_first.append(acc.runtime.last_first_skip.clone())
        single_skipped = acc.stats["skipped_mlp_blocks"]
        acc.reset_stats()
        T = max(lengths)
        batch = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):  # right padding: real tokens keep positions 0..n-1
            batch[i, :len(p)] = p
            mask[i, :len(p)] = 1
        out = tiny(input_ids=batch, attention_mask=mask).logits
        first = acc.runtime.last_first_skip.view(len(prompts), T)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n], singles[i], atol=1e-4, rtol=1e-4)
        assert torch.equal(first[i, :n], single_first[i])
    assert acc.stats["tokens"] == sum(lengths)  # padding is not counted
    assert acc.stats["skipped_mlp_blocks"] == pytest.approx(single_skipped)
    assert single_skipped > 0


def test_generate_left_padded_batch_equals_single_prompts(tiny):
    prompts = [ids(1, n)[0] for n in (12, 20)]
    tau = tau_in_a_gap(torch.cat([record_sims(tiny, p[None]) for p in prompts]), 0.4)
    acc = create_universal_accelerator(tiny, tau=tau, consecutive_k=1, min_layer=1)
    with acc, torch.no_grad():
        singles = [tiny.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):]
                   for p in prompts]
        T = 20
        batch = torch.zeros(2, T, dtype=torch.long)
        mask = torch.zeros(2, T, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as generate() expects
            batch[i, T - len(p):] = p
            mask[i, T - len(p):] = 1
        out = tiny.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert acc.stats["skipped_mlp_fraction"] > 0
    for i in range(2):
        assert torch.equal(out[i, T:], singles[i])


def test_leaving_the_context_restores_the_model_exactly(tiny):
    x = ids(1, 30)
    state = copy.deepcopy(tiny.state_dict())
    classes = [type(m) for m in tiny.modules()]
    with torch.no_grad():
        before = tiny(input_ids=x).logits
        acc = create_universal_accelerator(tiny, tau=0.5, consecutive_k=1)
        with acc:
            during = tiny(input_ids=x).logits
        after = tiny(input_ids=x).logits
    assert not torch.equal(before, during)  # exits happened
    assert torch.equal(before, after)
    assert [type(m) for m in tiny.modules()] == classes
    assert all(torch.equal(state[k], v) for k, v in tiny.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.modules())
    assert not any(k.startswith("_sedac") for m in tiny.modules() for k in vars(m))


def test_context_restores_even_when_the_forward_raises(tiny):
    acc = create_universal_accelerator(tiny, tau=0.5)
    with pytest.raises(IndexError):
        with acc:
            tiny(input_ids=torch.tensor([[10_000]]))  # token id outside the vocabulary
    assert all(not m._forward_hooks for m in tiny.modules())
    assert not acc.active


def test_first_token_never_exits(tiny):
    x = ids(3, 20)
    acc = create_universal_accelerator(tiny, tau=0.0, consecutive_k=1)  # every other token exits at layer 0
    with acc, torch.no_grad():
        tiny(input_ids=x)
    first = acc.runtime.last_first_skip.view(3, 20)
    assert (first[:, 0] == 6).all() and (first[:, 1:] == 1).all()
    assert acc.stats["exit_layer_histogram"] == {"0": 57, "none": 3}


@pytest.mark.parametrize("family", ["qwen3", "mistral", "gemma", "gemma2"])
def test_other_supported_layouts_run_and_restore(family):
    model = tiny_model(family)
    x = ids(1, 25)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        acc = create_universal_accelerator(model, tau=0.5, consecutive_k=1, min_layer=2)
        with acc:
            out = model(input_ids=x).logits
        assert torch.equal(model(input_ids=x).logits, ref)
    assert acc.stats["skipped_mlp_fraction"] > 0 and not torch.equal(out, ref)


def test_unsupported_layout_names_the_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=1, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="does not support GPT2LMHeadModel"):
        create_universal_accelerator(gpt2)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        create_universal_accelerator("not a model")


@pytest.mark.parametrize("kwargs,exc,message", [
    ({"tau": float("nan")}, ValueError, "tau must be a finite number"),
    ({"tau": "0.9"}, ValueError, "tau must be a finite number"),
    ({"consecutive_k": 0}, ValueError, r"consecutive_k must be in \[1, 6\]"),
    ({"consecutive_k": 2.5}, TypeError, "consecutive_k must be an integer"),
    ({"min_layer": 6}, ValueError, r"min_layer must be in \[0, 5\] \(the model has 6 layers\)"),
    ({"protect_last": -1}, ValueError, "protect_last must be in"),
    ({"scope": "cascading"}, ValueError, "scope must be one of 'cascade', 'per_layer'"),
])
def test_bad_arguments_are_named(tiny, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        create_universal_accelerator(tiny, **kwargs)


def test_nested_use_is_refused(tiny):
    a = create_universal_accelerator(tiny, tau=0.9)
    b = create_universal_accelerator(tiny, tau=0.9)
    with a:
        with pytest.raises(RuntimeError, match="already patched by SEDAC"):
            b.__enter__()
        with pytest.raises(RuntimeError, match="already active"):
            a.__enter__()
    assert all(not m._forward_hooks for m in tiny.modules())
