"""Tiny offline models: they build, transformers generates from them, LLaVA keys suit vLLM.

vLLM itself is not started here (slow); these checks take a few seconds.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipelines.tiny_models import MARKER, build_tiny_llava, build_tiny_qwen2_vl  # noqa: E402

N_NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"qwen2_vl": build_tiny_qwen2_vl(root / "qwen2_vl"), "llava": build_tiny_llava(root / "llava")}


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))


def _generate(folder, parts, **mm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], return_tensors="pt", **mm)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_generates_for_an_image(models, family):
    new = _generate(models[family], [{"type": "image"}], images=[_image()])
    assert len(new) == N_NEW


def test_qwen2_vl_generates_for_a_video(models):
    import numpy as np

    video = np.random.default_rng(1).integers(0, 255, (4, 120, 160, 3), dtype=np.uint8)
    assert len(_generate(models["qwen2_vl"], [{"type": "video"}], videos=[video])) == N_NEW


def test_llava_several_images(models):
    assert len(_generate(models["llava"], [{"type": "image"}] * 3, images=[_image()] * 3)) == N_NEW


def test_llava_vision_keys_use_vllm_layout(models):
    from safetensors import safe_open

    with safe_open(str(models["llava"] / "model.safetensors"), "pt") as f:
        vision = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)


def test_vocab_matches_tokenizer(models):
    from transformers import AutoConfig, AutoTokenizer

    for folder in models.values():
        config = AutoConfig.from_pretrained(folder)
        assert config.get_text_config().vocab_size == len(AutoTokenizer.from_pretrained(folder))


def test_builders_are_idempotent(models, tmp_path):
    folder = models["qwen2_vl"]
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_qwen2_vl(folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((folder / MARKER).read_text())["family"] == "qwen2_vl"
    with pytest.raises(FileExistsError):
        build_tiny_llava(folder)  # another family's folder is not silently reused
