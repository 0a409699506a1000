"""Tiny random-weight models of every supported family, for tests (ours and yours).

``tiny_model("llama", path)`` writes a local HF folder (config, safetensors
weights, a character-level tokenizer) that vLLM's CPU backend can serve too:
head_dim is 64, the size vLLM's CPU attention accepts.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")


def tiny_config(family: str, layers: int = 6, hidden: int = 128, intermediate: int = 256, vocab: int = 384,
                **extra: Any):
    import transformers

    common: Dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    classes: Dict[str, Tuple[str, Dict[str, Any]]] = {
        "llama": ("LlamaConfig", {}),
        "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
        "qwen3": ("Qwen3Config", {"use_sliding_window": False}),
        "mistral": ("MistralConfig", {"sliding_window": None}),
        "gemma": ("GemmaConfig", {"hidden_act": "gelu_pytorch_tanh"}),
        "gemma2": ("Gemma2Config", {"hidden_act": "gelu_pytorch_tanh", "sliding_window": 4096,
                                    "final_logit_softcapping": 30.0, "attn_logit_softcapping": None}),
    }
    if family not in classes:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    name, specific = classes[family]
    return getattr(transformers, name)(**{**common, **specific, **extra})


def tiny_model(family: str = "llama", path: Optional[Any] = None, seed: int = 0, **config: Any):
    """A random tiny causal LM (eval(), float32); saved with a tokenizer when ``path`` is given."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config), dtype=torch.float32)
    model.eval()
    if path is not None:
        path = Path(path)
        model.save_pretrained(path)
        save_char_tokenizer(path, model.config.vocab_size)
    return model


def save_char_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level tokenizer (ids 3..258 = bytes) as tokenizer.json, loadable by AutoTokenizer and vLLM."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259:
        raise ValueError("the byte tokenizer needs vocab_size >= 259")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    for i, ch in enumerate(sorted(byte_chars)):
        vocab[ch] = 3 + i
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("model_max_length", 2048)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def options_without_help(help_text: str) -> List[str]:
    """The options a command's ``--help`` lists with no text after them (``-h`` aside): every option of a
    SEDAC CLI says what it takes and its default. Reads the printed help, as a user sees it."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-[\w-]+)", line)  # an option's entry starts two spaces in
        if not m or m.group(1) == "-h":
            continue
        same_line = len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 2
        after = lines[i + 1] if i + 1 < len(lines) else ""
        next_line = after.startswith("   ") and not after.strip().startswith("-")
        if not (same_line or next_line):
            missing.append(m.group(1))
    return missing


def cli_help(main: Callable[[List[str]], Any], *argv: str) -> str:
    """What ``main([*argv, "--help"])`` prints (argparse exits with 0 after printing it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*argv, "--help"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
    return out.getvalue()


def subcommands(help_text: str) -> List[str]:
    """The subcommands a top-level ``--help`` lists (``{calibrate,evaluate}``)."""
    m = re.search(r"\{([\w,-]+)\}", help_text)
    return m.group(1).split(",") if m else []
