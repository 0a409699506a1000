"""Where the parts SEDAC touches live in a Hugging Face decoder model.

SEDAC needs, per model: the decoder layers (to read the residual stream after
each one), each layer's MLP (to skip it per token), the final norm and the LM
head (for the logit lens and the model's top-1). All supported families keep
them in the same places; what differs is the decoder-layer class and, for
Gemma-2/3, an extra norm around the MLP (whose output is zero when the MLP's
output is zero, so skipping the MLP still adds nothing to the residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

# decoder-layer class name -> family. The MLPs of all of these compute
# down(act(gate(x)) * up(x)) with gate_proj / up_proj / down_proj.
SUPPORTED_LAYERS: Dict[str, str] = {
    "LlamaDecoderLayer": "llama",
    "MistralDecoderLayer": "mistral",
    "Qwen2DecoderLayer": "qwen2",
    "Qwen3DecoderLayer": "qwen3",
    "GemmaDecoderLayer": "gemma",
    "Gemma2DecoderLayer": "gemma2",
    "Gemma3DecoderLayer": "gemma3",
}


class UnsupportedModelError(TypeError):
    """The model's layer layout is not one SEDAC knows how to patch."""


@dataclass
class DecoderLayout:
    """The modules of one HF causal LM that SEDAC reads or patches."""

    model: nn.Module
    family: str
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    logit_softcap: Optional[float]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        config: Any = self.model.config  # an HF config (nn.Module's __getattr__ types it Tensor | Module)
        return int(config.hidden_size)

    def mlp(self, layer: int) -> Any:  # an HF MLP module: gate_proj / up_proj / down_proj reached by attribute
        return self.layers[layer].mlp

    def logits(self, stream: torch.Tensor) -> torch.Tensor:
        """Logit lens: the model's final norm and LM head applied to a residual stream."""
        logits = self.lm_head(self.final_norm(stream))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


def _supported() -> str:
    return ", ".join(sorted({f"{f} ({c})" for c, f in SUPPORTED_LAYERS.items()}))


def find_layout(model: Any) -> DecoderLayout:
    """Locate layers, MLPs, final norm and LM head, or raise
    :class:`UnsupportedModelError` naming the model and layer class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    name = type(model).__name__
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    # multimodal wrappers (e.g. Gemma3ForConditionalGeneration) keep the text model one level deeper
    if layers is None and inner is not None and hasattr(inner, "language_model"):
        inner = inner.language_model
        layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"SEDAC does not support {name}: no decoder layers at model.layers. "
            f"Supported layer layouts: {_supported()}")
    layer_cls = type(layers[0]).__name__
    family = SUPPORTED_LAYERS.get(layer_cls)
    if family is None:
        raise UnsupportedModelError(
            f"SEDAC does not support {name} (decoder layer class {layer_cls}). Supported layer layouts: {_supported()}")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            raise UnsupportedModelError(
                f"SEDAC does not support {name}: layer {i} ({type(layer).__name__}) has no gate/up/down MLP")
    lm_head = getattr(model, "lm_head", None)
    norm = getattr(inner, "norm", None)
    if lm_head is None or norm is None:
        raise UnsupportedModelError(f"SEDAC does not support {name}: it needs model.norm and lm_head (a causal LM)")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return DecoderLayout(model, family, layers, norm, lm_head, float(softcap) if softcap else None)


def model_identity(source: Any) -> Dict[str, Any]:
    """What probe files and calibration records say about the model they were made for — the one
    function that computes it, from whatever is at hand:

    * a loaded Hugging Face model: every field;
    * a local model folder (path): every field, the fingerprint read from its safetensors files;
    * an HF config (object or dict): the sizes only (``fingerprint``, ``architecture`` None).

    ``fingerprint`` hashes the first 64 rows of the input embedding (rounded to float16), so it tells
    two checkpoints of one architecture apart while being the same for the fp32 and bf16 copies of one
    checkpoint.
    """
    import hashlib
    from pathlib import Path

    rows = None
    architecture = None
    config: Any
    if isinstance(source, nn.Module):
        hf_model: Any = source  # an HF PreTrainedModel: config and get_input_embeddings are not nn.Module's
        config = hf_model.config
        architecture = type(source).__name__
        emb = hf_model.get_input_embeddings().weight
        rows = emb[: min(64, emb.shape[0])].detach().to("cpu", torch.float16).contiguous()
    elif isinstance(source, (str, Path)):
        import json

        folder = Path(source)
        config = json.loads((folder / "config.json").read_text())
        architecture = (config.get("architectures") or [None])[0]
        rows = _embedding_rows(folder)
    else:
        config = source
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    elif isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))

    def size(*keys):
        for k in keys:
            v = get(k)
            if v is not None:
                return int(v)
        return None

    return {
        "architecture": architecture,
        "model_type": get("model_type"),
        "hidden_size": size("hidden_size"),
        "num_layers": size("num_hidden_layers", "num_layers"),
        "intermediate_size": size("intermediate_size"),
        "vocab_size": size("vocab_size"),
        "fingerprint": None if rows is None else hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16],
    }


def _embedding_rows(folder: Any) -> Optional[torch.Tensor]:
    """The first 64 rows of the input embedding, read lazily from a folder's safetensors files."""
    from pathlib import Path

    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                if name.endswith("embed_tokens.weight"):
                    return fh.get_slice(name)[:64].to(torch.float16).contiguous()
    return None
