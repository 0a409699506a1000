"""The real assets: built by ``nox -s tests`` (``sedac-bench assets``) and handed
over in ``SEDAC_ASSETS``. Missing assets fail here; they are never skipped."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sedac_bench import assets


@pytest.fixture(scope="module")
def root():
    value = os.environ.get("SEDAC_ASSETS")
    assert value, "SEDAC_ASSETS is not set: run the suite through `nox -s tests`, which builds the assets"
    return Path(value)


def test_manifest_verifies_and_lists_every_file(root):
    manifest = assets.verify(root)
    files = set(manifest["files"])
    assert {assets.TEXTS[k] for k in assets.TEXTS} <= files
    assert f"{assets.LLAMA}/model.safetensors" in files and f"{assets.QWEN2}/model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)  # safetensors only


def test_texts_are_real_prose_and_distinct(root):
    texts = {k: (root / rel).read_text() for k, rel in assets.TEXTS.items()}
    assert len(texts["enwiki"]) > 1_000_000 and "Anarchism" in texts["enwiki"]
    assert "{{" not in texts["enwiki"] and "[[" not in texts["enwiki"]
    assert len(texts["lee_news"]) > 300_000
    assert "assert" in texts["pydoc_topics"]
    first = {k: set(v.splitlines()[:200]) for k, v in texts.items()}
    assert not (first["enwiki"] & first["lee_news"])


def test_models_are_the_real_smollm2_and_agree(root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / assets.LLAMA)
    llama = AutoModelForCausalLM.from_pretrained(root / assets.LLAMA, dtype=torch.float32)
    qwen = AutoModelForCausalLM.from_pretrained(root / assets.QWEN2, dtype=torch.float32)
    assert type(llama).__name__ == "LlamaForCausalLM" and type(qwen).__name__ == "Qwen2ForCausalLM"
    assert llama.config.num_hidden_layers == 30 and llama.config.hidden_size == 576
    assert not any(t.any() for n, t in qwen.named_parameters() if n.endswith("_proj.bias"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = llama(ids).logits, qwen(ids).logits
        greedy = llama.generate(ids, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert "Paris" in tok.decode(greedy[0, ids.shape[1]:])  # a trained model, not random weights


def test_damaged_or_missing_assets_are_named(root, tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(root / "text", copy / "text")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k.startswith("text/")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assets.verify(copy)
    (copy / assets.TEXTS["lee_news"]).write_text("tampered")
    with pytest.raises(assets.AssetError, match=r"checksum mismatch\): .*lee_news.txt"):
        assets.verify(copy)
    (copy / assets.TEXTS["lee_news"]).unlink()
    with pytest.raises(assets.AssetError, match=r"SEDAC asset missing: .*lee_news.txt"):
        assets.verify(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(assets.AssetError, match="is not valid JSON"):
        assets.verify(copy)
    with pytest.raises(assets.AssetError, match="missing manifest.json"):
        assets.verify(tmp_path / "nowhere")


def test_missing_source_package_is_named():
    with pytest.raises(assets.AssetError, match=r"'no-such-dist' is not installed.*pip install --no-deps no-such-dist"):
        assets.package_dir("no_such_module_xyz", "no-such-dist")


def test_second_build_is_a_verified_no_op(root):
    lines = []
    assert assets.build(root, log=lines.append) == root.resolve()
    assert lines == [f"SEDAC assets complete and verified at {root.resolve()}"]


def test_wiki_markup_stripper():
    text = ("{{Infobox|x={{nested}}}}\n'''Bold''' [[Target|shown]] and [[plain]] text "
            "<ref>cite</ref> with enough words to count as a prose paragraph of an article.\n== Heading ==\n"
            "* list item\nA long paragraph that still holds {{broken markup after stripping and is dropped entirely.")
    assert assets.strip_wiki_markup(text) == (
        "Bold shown and plain text  with enough words to count as a prose paragraph of an article.")
