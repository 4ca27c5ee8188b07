"""tau_theta conditioners and tokenizers (Sec. 3.3, App. E.2): CPU, tiny sizes, no network."""
import json

import pytest
import torch

from ldm.diffusion.conditioners import (
    ClassEmbedder,
    ConcatConditioner,
    FrozenHFCLIPTextEncoder,
    FrozenOpenCLIPTextEncoder,
    SpatialRescaler,
    TextTransformer,
    TextTransformerConfig,
)
from ldm.diffusion.tokenizers import (
    BertTokenizer,
    HFCLIPTokenizer,
    OpenCLIPTokenizer,
    build_tokenizer,
)

DEBUG_TEXT = TextTransformerConfig(
    vocab_size=100, max_length=16, width=32, depth=2, num_heads=2, head_dim=8, empty_ids=(2, 3))
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s", "dog"]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", CLIP BPE
TINY_OPEN_CLIP = "ldm-test-tiny-clip"


# ---------------------------------------------------------------- TextTransformer


def test_text_transformer_shapes_and_gradients():
    model = TextTransformer(DEBUG_TEXT)
    tokens_BL = torch.randint(0, DEBUG_TEXT.vocab_size, (3, DEBUG_TEXT.max_length))
    out_BLD = model(tokens_BL)
    assert out_BLD.shape == (3, 16, 32)
    out_BLD.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model(tokens_BL[:, :5]).shape == (3, 5, 32)  # shorter sequences use the first positions


def test_text_transformer_is_unmasked():
    # The paper's encoder attends to padding: a pad token changes every other position's output.
    model = TextTransformer(DEBUG_TEXT).eval()
    tokens_BL = torch.zeros(1, DEBUG_TEXT.max_length, dtype=torch.long)
    tokens_BL[0, :4] = torch.tensor([2, 50, 51, 3])
    changed_BL = tokens_BL.clone()
    changed_BL[0, 10] = 7
    with torch.no_grad():
        a, b = model(tokens_BL), model(changed_BL)
    assert not torch.allclose(a[0, 0], b[0, 0])  # position 0 sees position 10: no causal mask
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_text_transformer_rejects_long_tokens_and_null_condition():
    model = TextTransformer(DEBUG_TEXT)
    with pytest.raises(ValueError, match="max_length"):
        model(torch.zeros(1, DEBUG_TEXT.max_length + 1, dtype=torch.long))
    null_BL = model.null_condition(2)
    assert null_BL.shape == (2, 16) and null_BL.dtype == torch.long
    assert null_BL[:, :2].tolist() == [[2, 3], [2, 3]] and (null_BL[:, 2:] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        TextTransformerConfig(vocab_size=50, empty_ids=(101, 102))


def test_text_transformer_paper_parameter_count():
    cfg = TextTransformerConfig()  # the released 1.45B model's tau_theta
    with torch.device("meta"):
        model = TextTransformer(cfg)
    w, inner, mlp = 1280, 8 * 64, 1280 * 4
    block = 2 * 2 * w + 3 * w * inner + (inner * w + w) + (w * mlp + mlp) + (mlp * w + w)
    formula = 30522 * w + 77 * w + 32 * block + 2 * w
    count = sum(p.numel() for p in model.parameters())
    assert count == formula
    assert abs(count - 542.9e6) / 542.9e6 < 1e-3
    assert cfg.empty_ids == (101, 102)  # BERT's [CLS] [SEP]


# ---------------------------------------------------------------- class / concat conditioners


def test_class_embedder():
    embedder = ClassEmbedder(num_classes=10, embed_dim=8)
    assert embedder.embedding.weight.shape == (11, 8)  # + the null class row
    labels_B = torch.tensor([0, 9, 10])
    out_B1D = embedder(labels_B)
    assert out_B1D.shape == (3, 1, 8)
    null_B = embedder.null_condition(4)
    assert null_B.tolist() == [10] * 4
    assert torch.equal(embedder(null_B)[0, 0], embedder.embedding.weight[10])
    for bad in ([11], [-1]):
        with pytest.raises(ValueError, match=r"\[0, 10\]"):
            embedder(torch.tensor(bad))
    with pytest.raises(ValueError, match=r"\[B\]"):
        embedder(torch.zeros(2, 1, dtype=torch.long))


def test_concat_conditioner_and_spatial_rescaler():
    concat = ConcatConditioner(channels=3)
    c_BCHW = torch.randn(2, 3, 8, 8)
    assert concat(c_BCHW) is c_BCHW
    assert torch.equal(concat.null_like(c_BCHW), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        concat(torch.randn(2, 4, 8, 8))

    rescaler = SpatialRescaler(num_stages=2, in_channels=182, out_channels=3, multiplier=0.5)
    assert rescaler.channel_mapper.bias is None
    seg_BCHW = torch.randn(2, 182, 64, 64)
    out = rescaler(seg_BCHW)
    assert out.shape == (2, 3, 16, 16)
    out.sum().backward()
    assert rescaler.channel_mapper.weight.grad is not None
    with pytest.raises(ValueError, match="182"):
        rescaler(torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------- tokenizers


def _write_bert_vocab(folder, tokens):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return folder


def test_bert_tokenizer_from_tiny_vocab(tmp_path):
    folder = _write_bert_vocab(tmp_path / "bert", TINY_VOCAB)
    tok = BertTokenizer(str(folder), max_length=8)
    assert tok.vocab_size == len(TINY_VOCAB) and tok.max_length == 8
    assert tok.empty_ids == (2, 3)
    ids = tok(["A photo of cats", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    assert ids.tolist() == [[2, 5, 6, 7, 8, 9, 3, 0], [2, 3, 0, 0, 0, 0, 0, 0]]
    long_ids = tok(["a dog of a cat of a dog of a cat"])
    assert long_ids.tolist() == [[2, 5, 10, 7, 5, 8, 7, 3]]  # truncated, [SEP] kept last
    from_file = BertTokenizer(str(folder / "vocab.txt"), max_length=8)
    assert from_file(["a cat"]).tolist() == [[2, 5, 8, 3, 0, 0, 0, 0]]


def test_bert_tokenizer_refuses_fake_vocabularies(tmp_path):
    fake = _write_bert_vocab(tmp_path / "fake", ["[PAD]", "[UNK]", "foo"])
    with pytest.raises(ValueError, match="vocab.txt"):
        BertTokenizer(str(fake))
    # Offline with no cache, transformers 5.x returns a 5-token all-UNK tokenizer instead of raising.
    with pytest.raises(ValueError, match="ldm-test/no-such-bert"):
        BertTokenizer("ldm-test/no-such-bert")


def test_open_clip_tokenizer_matches_open_clip():
    import open_clip

    tok = OpenCLIPTokenizer()
    assert tok.empty_ids == (49406, 49407) and tok.vocab_size == 49408 and tok.max_length == 77
    ids = tok(["a photo of a cat", "Hello, World!"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == CAT_IDS and (ids[0, 7:] == 0).all()
    assert torch.equal(ids, open_clip.tokenize(["a photo of a cat", "Hello, World!"]))
    short = OpenCLIPTokenizer(max_length=5)(["a photo of a cat"])
    assert short.tolist() == [[49406, 320, 1125, 539, 49407]]


def _write_hf_clip_tokenizer(folder):
    """vocab.json + merges.txt from the BPE vocabulary that ships with open_clip (offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def test_hf_clip_tokenizer_matches_open_clip(tmp_path):
    folder = _write_hf_clip_tokenizer(tmp_path / "clip")
    tok = HFCLIPTokenizer(str(folder), max_length=77)
    assert tok.empty_ids == (49406, 49407) and tok.vocab_size == 49408
    texts = ["a photo of a cat", "Hello, World! it's 3pm"]
    ids, reference = tok(texts), OpenCLIPTokenizer()(texts)
    for row, ref_row in zip(ids, reference):
        n = int((ref_row != 0).sum())  # open_clip pads with 0, this tokenizer with <|endoftext|>
        assert row[:n].tolist() == ref_row[:n].tolist()
    with pytest.raises(ValueError, match="merges.txt"):
        HFCLIPTokenizer("ldm-test/no-such-clip")


def test_build_tokenizer(tmp_path):
    folder = _write_bert_vocab(tmp_path / "bert", TINY_VOCAB)
    assert isinstance(build_tokenizer("bert", str(folder), 8), BertTokenizer)
    assert isinstance(build_tokenizer("openclip", None, 77), OpenCLIPTokenizer)
    with pytest.raises(ValueError, match="kind"):
        build_tokenizer("t5", None, 77)
    with pytest.raises(ValueError, match="name_or_path"):
        build_tokenizer("bert", None, 77)
    with pytest.raises(ValueError, match="None"):
        build_tokenizer("openclip", str(folder), 77)


# ---------------------------------------------------------------- frozen encoders


@pytest.fixture(scope="module")
def tiny_open_clip_arch(tmp_path_factory):
    """Registers the smallest open_clip CLIP we can build under a test-only name."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    }
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def _open_clip_reference(model, tokens_BL, num_blocks):
    """SD 2.x recipe on the full open_clip model: embed, run `num_blocks` blocks, ln_final."""
    x = model.token_embedding(tokens_BL) + model.positional_embedding
    for block in model.transformer.resblocks[:num_blocks]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def _assert_frozen(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_frozen_open_clip_loads_local_checkpoint(tiny_open_clip_arch, tmp_path, suffix):
    import open_clip
    from safetensors.torch import save_file

    reference = open_clip.create_model(tiny_open_clip_arch).eval()
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    tokens_BL = OpenCLIPTokenizer()(["a photo of a cat", "a dog"])
    for layer, num_blocks in (("last", 3), ("penultimate", 2)):
        encoder = FrozenOpenCLIPTextEncoder(tiny_open_clip_arch, str(path), layer)
        assert len(encoder.blocks) == num_blocks
        with torch.no_grad():
            out_BLD = encoder(tokens_BL)
            expected = _open_clip_reference(reference, tokens_BL, num_blocks)
        assert out_BLD.shape == (2, 77, 32)
        torch.testing.assert_close(out_BLD, expected)


def test_frozen_open_clip_random_init_frozen_and_null(tiny_open_clip_arch):
    encoder = FrozenOpenCLIPTextEncoder(tiny_open_clip_arch, pretrained=None)
    _assert_frozen(encoder)
    assert isinstance(encoder.tokenizer, OpenCLIPTokenizer)
    assert not any(n.startswith("visual") for n, _ in encoder.named_parameters())  # text tower only
    null_BL = encoder.null_condition(3)
    assert null_BL.shape == (3, 77) and null_BL[:, :2].tolist() == [[49406, 49407]] * 3
    tokens_BL = encoder.tokenizer(["a photo of a cat"])
    with torch.no_grad():
        out = encoder(tokens_BL)
        changed = tokens_BL.clone()
        changed[0, 20] = 320
        # CLIP is causal (SD keeps that): a later token leaves earlier positions unchanged.
        torch.testing.assert_close(encoder(changed)[0, :20], out[0, :20])
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPTextEncoder(tiny_open_clip_arch, None, layer="pooled")


def test_frozen_open_clip_bad_pretrained(tiny_open_clip_arch, tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ValueError, match="local checkpoint"):
        FrozenOpenCLIPTextEncoder(tiny_open_clip_arch, str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        FrozenOpenCLIPTextEncoder("ViT-Nope-99", None)
    # A real tag with nothing cached fails offline before any model is built.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ValueError, match="pass pretrained=<local path"):
        FrozenOpenCLIPTextEncoder("ViT-B-32", "laion2b_s34b_b79k")


def test_frozen_hf_clip_round_trip(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    reference = CLIPTextModel(config).eval()
    folder = tmp_path / "hf_clip"
    reference.save_pretrained(folder)
    _write_hf_clip_tokenizer(folder)

    encoder = FrozenHFCLIPTextEncoder(str(folder))
    _assert_frozen(encoder)
    assert isinstance(encoder.tokenizer, HFCLIPTokenizer) and encoder.max_length == 77
    tokens_BL = encoder.tokenizer(["a photo of a cat", "a dog"])
    assert tokens_BL[0, :7].tolist() == CAT_IDS
    with torch.no_grad():
        out_BLD = encoder(tokens_BL)
        expected = reference(input_ids=tokens_BL).last_hidden_state
    assert out_BLD.shape == (2, 77, 32)
    torch.testing.assert_close(out_BLD, expected)
    null_BL = encoder.null_condition(2)
    assert null_BL.shape == (2, 77) and null_BL[:, :2].tolist() == [[49406, 49407]] * 2
    with pytest.raises(ValueError, match="ldm-test/no-such-model"):
        FrozenHFCLIPTextEncoder("ldm-test/no-such-model")
