"""from_pretrained_encoders on tiny checkpoints saved to a tmp folder, and position resizing."""

from __future__ import annotations

import pytest
import torch

from leccr_core.config import LeccrConfig
from leccr_core.model import LeccrModel, load_tokenizer, resize_clip_positions

from .tiny import TEXT_W, VOCAB, tiny_bert, tiny_clip

PROJ = 24   # != CLIP's default 512: a full-CLIP checkpoint must keep its own projection size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import BertTokenizer, CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=PROJ))
    clip.save_pretrained(root / "clip")                           # full CLIP, like openai/clip-vit-*
    tiny_clip(image_size=224, patch_size=32, projection_dim=PROJ).save_pretrained(root / "clip-vision")
    tiny_bert().save_pretrained(root / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(root / "bert")
    return root, clip


def cfg_for(root, vision="clip", **kw):
    return LeccrConfig(vision_model=str(root / vision), text_model=str(root / "bert"), d=PROJ,
                       text_width=TEXT_W, embed_dim=16, image_size=384, **kw)


@pytest.mark.parametrize("vision", ["clip", "clip-vision"])
def test_from_pretrained_encoders_runs_at_384(checkpoints, vision):
    root, clip = checkpoints
    cfg = cfg_for(root, vision)
    model = LeccrModel.from_pretrained_encoders(cfg).eval()
    emb = model.vision.vision_model.embeddings
    assert emb.position_embedding.weight.shape[0] == 145 and model.vision.config.image_size == 384
    if vision == "clip":   # the weights really came from the checkpoint
        assert torch.equal(model.vision.visual_projection.weight, clip.visual_projection.weight)
        assert torch.equal(emb.position_embedding.weight[0], clip.vision_model.embeddings.position_embedding.weight[0])
    assert model.text.pooler is None

    tok = load_tokenizer(cfg)
    caps = tok(["a dog runs on the grass", "ein hund läuft"], padding=True, return_tensors="pt")
    desc = tok(["the man with a red ball", "a cat"], padding=True, return_tensors="pt")
    assert (caps["input_ids"] != tok.unk_token_id).sum() > 6      # the vocab was really used
    with torch.no_grad():
        out = model(torch.randn(2, 3, 384, 384), desc["input_ids"], desc["attention_mask"],
                    caps["input_ids"], caps["attention_mask"], caps["input_ids"], caps["attention_mask"])
    assert out.z_v.shape == (2, 145, PROJ) and out.v_hat.shape == (2, 16) and out.h_s.shape == (2, 16)


def test_interpolated_grid_matches_transformers_and_is_identity_at_native_size():
    torch.manual_seed(1)
    ref = tiny_clip(image_size=224, patch_size=32, projection_dim=PROJ).eval()
    table = ref.vision_model.embeddings.position_embedding.weight.detach().clone()   # [50, w]

    same = tiny_clip(image_size=224, patch_size=32, projection_dim=PROJ)
    same.load_state_dict(ref.state_dict())
    resize_clip_positions(same, 224)                                 # 7x7 -> 7x7
    assert torch.allclose(same.vision_model.embeddings.position_embedding.weight, table, atol=1e-6)

    big = tiny_clip(image_size=224, patch_size=32, projection_dim=PROJ)
    big.load_state_dict(ref.state_dict())
    resize_clip_positions(big, 384)                                  # 7x7 -> 12x12
    new = big.vision_model.embeddings.position_embedding.weight
    assert new.shape == (145, table.shape[1]) and torch.equal(new[0], table[0])
    assert not torch.allclose(new[1:50], table[1:], atol=1e-3)
    # transformers' own per-forward bicubic interpolation gives the same tokens at 384 px
    pixels = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        got = big.eval().vision_model(pixel_values=pixels).last_hidden_state
    assert got.shape == (1, 145, 32) and torch.allclose(got, want, atol=1e-5)
