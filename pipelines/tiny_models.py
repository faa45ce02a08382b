"""Tiny random-weight multimodal models for tests and the offline demo.

Nothing can be downloaded on the CI/test machines, so these builders create, fully
offline, a complete Hugging Face model folder (config, safetensors, tokenizer, processor,
chat template) that both vLLM (`vllm.LLM(model=str(folder))`) and transformers
(`AutoProcessor` + `AutoModelForImageTextToText`) load. The outputs are gibberish; the
point is exercising the real code paths (prompting, multimodal preprocessing, batching).

Sizes obey vLLM CPU constraints: attention head size 32 (its CPU attention supports
32/64/80/...). Builders are idempotent: a folder with a matching marker file is reused.
torch/transformers are imported inside the functions so that importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MARKER = "leccr_tiny_model.json"
_FORMAT_VERSION = 1

# Small English corpus for the BPE tokenizer: enough merges for readable-ish token pieces.
_CORPUS = """\
A person is walking a dog along a quiet street in the morning.
Two children are playing football in a green park while their parents watch.
A woman slices vegetables on a wooden table in a bright kitchen.
The video shows a man riding a bicycle through the city at night.
A cat sleeps on a sofa next to a window, and the sun is shining.
People are dancing on a stage; the music is loud and the lights are colorful.
A red car drives down a mountain road surrounded by trees and snow.
Describe the image. Describe the video. What is happening in this scene?
The image shows a group of friends eating dinner at a restaurant.
A chef explains how to cook pasta, then adds tomato sauce and cheese.
Birds fly over the ocean as waves break on the sandy beach.
An old man reads a newspaper on a bench in the train station.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9
"""

# Qwen2-VL special tokens, in the order Qwen's tokenizer lists its added tokens.
_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# ChatML template like Qwen2-VL's; a content part is either a string or OpenAI-style parts
# ({"type": "image"}, {"type": "video"}, {"type": "text", "text": ...}). Iterating over the
# parts also makes vLLM's server detect the "openai" content format.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5 style template: "USER: <image>\n... ASSISTANT:". Several image parts give
# several <image> placeholders (used for "video as frames").
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }} "
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}<image>\n"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _existing(out_dir: Path, family: str, seed: int) -> Path | None:
    """Return out_dir if it holds a complete build of this family/seed, else None."""
    marker = out_dir / MARKER
    if not marker.is_file():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists, is not empty and is not a tiny model folder")
        return None
    info = json.loads(marker.read_text())
    wanted = {"family": family, "seed": seed, "format_version": _FORMAT_VERSION}
    if {k: info.get(k) for k in wanted} != wanted:
        raise FileExistsError(f"{out_dir} holds another tiny model: {info}")
    return out_dir


def _build_atomically(out_dir: Path, family: str, seed: int, build) -> Path:
    """Build into a temp sibling folder, write the marker last, then rename into place.

    A crash never leaves a half-built folder that looks complete, and two processes
    building the same folder at once both end up with one complete copy.
    """
    out_dir = Path(out_dir)
    if _existing(out_dir, family, seed):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder may be shared/served
    try:
        info = build(tmp, seed)
        info.update(family=family, seed=seed, format_version=_FORMAT_VERSION)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked by _existing); os.replace needs it gone or empty
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _existing(out_dir, family, seed):  # lost a race: the winner's copy is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _train_tokenizer(specials: list[str], vocab_size: int, **fast_kwargs):
    """Byte-level BPE trained on the built-in corpus; specials get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **fast_kwargs)


def build_tiny_qwen2_vl(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Qwen2-VL (~0.36M params): images and videos, loadable by vLLM and transformers."""
    return _build_atomically(Path(out_dir), "qwen2_vl", seed, _build_qwen2_vl)


def _build_qwen2_vl(out: Path, seed: int) -> dict:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _train_tokenizer(
        _QWEN_SPECIALS,
        vocab_size=512,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),  # exactly the tokenizer: every sampled id decodes
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,  # vLLM CPU attention supports 32/64/80/...
            max_position_embeddings=4096,
            # mrope halves of head_dim: 4 + 6 + 6 = 16 = head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        # hidden_size is the merger's output = the text hidden size
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)

    # Small max_pixels keeps the vision token count (and test time) low; the video
    # processor's default min_pixels (128*28*28) is above that, so set both.
    size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Tiny LLaVA-1.5 style model (CLIP vision tower + Llama), images only."""
    return _build_atomically(Path(out_dir), "llava", seed, _build_llava)


def _build_llava(out: Path, seed: int) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _train_tokenizer(
        _LLAVA_SPECIALS,
        vocab_size=512,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = _LLAVA_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _LLAVA_SPECIALS}
    image_size, patch_size = 56, 14  # 4x4 = 16 image tokens per image
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=4096,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
        ),
        image_token_index=ids["<image>"],
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",  # drops CLS
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out)

    # transformers 5 saves the CLIP tower as `vision_tower.*`; vLLM's LLaVA loader wants the
    # original checkpoint layout `vision_tower.vision_model.*` (transformers loads both).
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    renamed = {
        (
            "vision_tower.vision_model." + k[len("vision_tower.") :]
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
            else k
        ): v
        for k, v in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------- text models for translate

def build_tiny_qwen2_chat(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Qwen2 chat LM (text only, ~140k params) for the translate stage's vllm/openai engines."""
    return _build_atomically(Path(out_dir), "qwen2_chat", seed, _build_qwen2_chat)


def _build_qwen2_chat(out: Path, seed: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(_QWEN_SPECIALS, vocab_size=512, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),  # exactly the tokenizer: every sampled id decodes
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM CPU attention supports 32/64/80/...
        max_position_embeddings=4096,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


# A few caption-like sentences per language for the seq2seq tokenizer, so that its subwords
# cover the scripts the tests use (Latin with diacritics, CJK, Cyrillic).
_MT_CORPUS = """\
A dog runs on the beach. Two children are playing football in a park.
Ein Hund läuft am Strand. Zwei Kinder spielen Fußball in einem Park.
Un chien court sur la plage. Deux enfants jouent au football dans un parc.
Pes běží po pláži. Dvě děti hrají fotbal v parku.
Um cão corre na praia. Duas crianças estão jogando futebol em um parque.
犬が浜辺を走っている。二人の子供が公園でサッカーをしている。
一只狗在海滩上奔跑。两个孩子在公园里踢足球。
Собака бежит по пляжу. Двое детей играют в футбол в парке.
"""


def build_tiny_nllb(out_dir: Path, seed: int = 0) -> Path:
    """Tiny NLLB-200 style seq2seq model (M2M100 architecture + an NLLB tokenizer with the 202
    FLORES-200 language tokens), ~240k params, for the transformers translate engine.

    Random weights would mostly pick special tokens (which decode to nothing); the output
    projection rows of every special token, EOS included, are zero, so the model always writes
    `max_new_tokens` ordinary subwords: gibberish of a predictable length.
    """
    return _build_atomically(Path(out_dir), "nllb", seed, _build_nllb)


def _build_nllb(out: Path, seed: int) -> dict:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # NLLB's first four ids
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(_MT_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = NllbTokenizer(vocab=trained["vocab"], merges=merges)  # adds the language tokens
    config = M2M100Config(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # as NLLB: </s>, then the forced language token
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.all_special_ids] = 0.0
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def build_tiny_marian(out_dir: Path, seed: int = 0) -> Path:
    """Tiny Marian (opus-mt style, one language pair: en -> de), ~60k params, with a locally
    trained SentencePiece vocabulary; for the transformers translate engine's Marian path."""
    return _build_atomically(Path(out_dir), "marian_en_de", seed, _build_marian)


def _build_marian(out: Path, seed: int) -> dict:
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    work = out / "_spm"
    work.mkdir()
    (work / "corpus.txt").write_text(_MT_CORPUS, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(work / "corpus.txt"), model_prefix=str(work / "sp"), vocab_size=120,
                                   character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    pieces = spm.SentencePieceProcessor(model_file=str(work / "sp.model"))
    vocab = {"</s>": 0, "<unk>": 1}  # Marian's layout: eos 0, pad last
    for i in range(pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (work / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # one model per pair: the tokenizer records it, as Helsinki-NLP's opus-mt folders do
    tokenizer = MarianTokenizer(str(work / "sp.model"), str(work / "sp.model"), str(work / "vocab.json"),
                                source_lang="en", target_lang="de")
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(work)
    return {"params": sum(p.numel() for p in model.parameters())}


# --------------------------------------------------------------------------- encoders for train

# German adjective/article endings shared as "##" pieces (see _word_vocab).
INFLECTIONS = ("e", "em", "en", "er", "es")


def _word_vocab(texts) -> list[str]:
    """A whole-word WordPiece vocab of every word in `texts` (plus single characters, so no word
    is ever [UNK])."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    # the fast BERT tokenizer's own normalisation (lowercase, accents stripped) and word split
    norm, split = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = {w for t in texts for w, _ in split.pre_tokenize_str(norm.normalize_str(t))}
    # WordPiece-like sharing for inflections: a word that is a stem (3+ letters; a word itself,
    # or shared by several forms) plus a German adjective/article ending is left out, so
    # "rotem" tokenizes as "rot ##em" and a form never seen in training shares its stem.
    forms: dict[str, set[str]] = {}
    for w in words:
        for e in INFLECTIONS:
            if w.endswith(e) and len(w) - len(e) >= 3:
                forms.setdefault(w[:-len(e)], set()).add(w)
    stems = {s for s, f in forms.items() if s in words or len(f) >= 2}   # "groß" from große/großer
    words = sorted((words - {w for s in stems for w in forms[s]}) | stems)
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{e}" for e in INFLECTIONS)]
    return vocab + [c for c in chars if c not in set(vocab)] + [f"##{c}" for c in chars if f"##{c}" not in set(vocab)]


def _save_tiny_bert(out: Path, vocab: list[str], width: int, layers: int, dropout: float) -> int:
    from transformers import BertConfig, BertModel, BertTokenizer
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=width, num_hidden_layers=layers,
                                 num_attention_heads=4, intermediate_size=2 * width, max_position_embeddings=256,
                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    model.save_pretrained(out)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _save_tiny_clip(out: Path, image_size: int, patch_size: int, width: int, layers: int, dropout: float) -> int:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=width, attention_dropout=dropout))
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build_tiny_encoders(out: Path, texts, seed: int = 0, image_size: int = 64, patch_size: int = 16,
                        width: int = 64, layers: int = 2, dropout: float = 0.0) -> tuple[Path, Path]:
    """Random-weight CLIP vision tower (projection = width) and BERT (hidden = width) with a
    whole-word vocab of `texts`, under out/vision and out/text (one seed for both, BERT first:
    the synthetic learning check and its benchmarks depend on these exact weights)."""
    import torch
    out = Path(out)
    torch.manual_seed(seed)
    _save_tiny_bert(out / "text", _word_vocab(texts), width, layers, dropout)
    _save_tiny_clip(out / "vision", image_size, patch_size, width, layers, dropout)
    return out / "vision", out / "text"


# Words the tiny BERT knows without a workdir: the built-in English and MT corpora.
def _default_texts() -> list[str]:
    return (_CORPUS + _MT_CORPUS).splitlines()


def build_tiny_clip(out_dir: Path, seed: int = 0, image_size: int = 64) -> Path:
    """Tiny CLIP vision tower with projection (64 wide, 2 layers, patch 16): a local
    `train --vision-model` (train with `--image-size` equal to its image_size)."""
    def build(out: Path, seed: int) -> dict:
        import torch
        torch.manual_seed(seed)
        return {"params": _save_tiny_clip(out, image_size, 16, 64, 2, 0.0), "image_size": image_size}
    return _build_atomically(Path(out_dir), f"clip_vision_{image_size}", seed, build)


def build_tiny_bert(out_dir: Path, seed: int = 0, texts=None) -> Path:
    """Tiny BERT (64 wide, 2 layers) whose vocab holds every word of `texts` (default: a small
    built-in multilingual corpus; other words split into characters): a local `train --text-model`."""
    words = list(texts) if texts is not None else _default_texts()
    vocab = _word_vocab(words)
    digest = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:12]

    def build(out: Path, seed: int) -> dict:
        import torch
        torch.manual_seed(seed)
        return {"params": _save_tiny_bert(out, vocab, 64, 2, 0.0), "vocab_size": len(vocab)}
    # the vocab is part of the family name: another vocab never silently reuses this folder
    return _build_atomically(Path(out_dir), f"bert_{digest}", seed, build)
