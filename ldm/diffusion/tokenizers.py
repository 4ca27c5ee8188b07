"""Tokenizers for the text conditioners tau_theta (Sec. 3.3, App. E.2).

Plain objects, not modules: `tokenizer(texts) -> LongTensor[B, max_length]`, truncated and padded
to `max_length`, so that a batch of captions becomes the token input `y` of tau_theta(y) (Eq. 3).
Each exposes `vocab_size`, `max_length` and `empty_ids`, the ids of the tokenised empty string
before padding, which is the "empty" condition of classifier-free guidance.

This file and `ldm/diffusion/conditioners.py` are the only places in ldm/ that touch files: vocabularies
come from a hub id or a local path through transformers / open_clip (their I/O, not ours). Those
libraries are imported lazily so that `import ldm` stays pure torch.
"""
import torch

# Words that every English vocabulary holds. A tokenizer that maps any of them to UNK (or to an
# id outside its own vocabulary) is not the vocabulary the caller asked for.
PROBE_TEXT = "a photo of a cat"

TOKENIZER_KINDS = ("bert", "openclip", "hf_clip")


def _check_vocabulary(hf_tokenizer, name_or_path: str, needed_files: str) -> None:
    # transformers 5.x, offline and without a cache, silently returns a 2-5 token vocabulary
    # that maps every word to UNK instead of raising: refuse it here.
    ids = hf_tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unknown = [i for i in ids if i == hf_tokenizer.unk_token_id or i >= len(hf_tokenizer)]
    if not ids or unknown:
        raise ValueError(
            f"the tokenizer loaded from {name_or_path!r} has {len(hf_tokenizer)} tokens and maps "
            f"{PROBE_TEXT!r} to unknown ids {ids}: it is not a real vocabulary (offline without a "
            f"cached copy?). Pass a local folder holding {needed_files} instead.")


def _load_hf_tokenizer(hf_class, name_or_path: str, needed_files: str):
    try:
        hf_tokenizer = hf_class.from_pretrained(name_or_path)
    except OSError as err:
        raise ValueError(
            f"could not load a tokenizer from {name_or_path!r}: pass a hub id that is cached "
            f"(or reachable) or a local folder holding {needed_files}.") from err
    _check_vocabulary(hf_tokenizer, name_or_path, needed_files)
    return hf_tokenizer


def _encode_padded(hf_tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    encoding = hf_tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length,
        return_tensors="pt")
    return encoding["input_ids"].long()  # [B, max_length]


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length={max_length} cannot hold the start and end tokens; use >= 2")


class BertTokenizer:
    """BERT WordPiece tokenizer of the paper's text-to-image model (App. E.2: vocab 30522, 77 tokens).

    `name_or_path` is a hub id (e.g. "bert-base-uncased"), a local folder holding vocab.txt or
    tokenizer.json, or a path to a vocab.txt. Texts become [CLS] ... [SEP] padded with [PAD] (id 0).
    """

    def __init__(self, name_or_path: str, max_length: int = 77):
        from transformers import BertTokenizerFast

        _check_max_length(max_length)
        self.hf_tokenizer = _load_hf_tokenizer(BertTokenizerFast, name_or_path, "a vocab.txt")
        self.max_length = max_length
        self.vocab_size = len(self.hf_tokenizer)
        self.empty_ids = tuple(self.hf_tokenizer("")["input_ids"])  # (101, 102) for BERT

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return _encode_padded(self.hf_tokenizer, texts, self.max_length)


class HFCLIPTokenizer:
    """transformers' CLIP BPE tokenizer, from the same hub id / folder as a `CLIPTextModel`.

    Pads with whatever the folder's tokenizer config names (openai/clip-vit-large-patch14 pads
    with <|endoftext|>, SD 2.x's tokenizer with "!"), so tokens match the model it ships with.
    """

    def __init__(self, name_or_path: str, max_length: int = 77):
        from transformers import CLIPTokenizerFast

        _check_max_length(max_length)
        self.hf_tokenizer = _load_hf_tokenizer(
            CLIPTokenizerFast, name_or_path, "vocab.json and merges.txt (or tokenizer.json)")
        self.max_length = max_length
        self.vocab_size = len(self.hf_tokenizer)
        self.empty_ids = tuple(self.hf_tokenizer("")["input_ids"])  # (49406, 49407) for CLIP

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return _encode_padded(self.hf_tokenizer, texts, self.max_length)


class OpenCLIPTokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary shipped in the wheel, so it works offline).

    <start_of_text> ... <end_of_text> padded with 0; a truncated text keeps <end_of_text> last.
    """

    def __init__(self, max_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        _check_max_length(max_length)
        self.bpe = SimpleTokenizer(context_length=max_length)
        self.max_length = max_length
        self.vocab_size = len(self.bpe.encoder)  # 49408
        self.empty_ids = (self.bpe.sot_token_id, self.bpe.eot_token_id)  # (49406, 49407)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.bpe(list(texts), context_length=self.max_length).long()  # [B, max_length]


def build_tokenizer(kind: str, name_or_path: str | None, max_length: int):
    """kind "bert" | "hf_clip" need `name_or_path`; "openclip" takes None (its vocabulary ships)."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {TOKENIZER_KINDS}")
    if kind == "openclip":
        if name_or_path is not None:
            raise ValueError(
                f"the openclip tokenizer uses the vocabulary shipped with open_clip; set "
                f"name_or_path to None instead of {name_or_path!r}")
        return OpenCLIPTokenizer(max_length)
    if name_or_path is None:
        raise ValueError(f"tokenizer kind {kind!r} needs name_or_path (a hub id or a local folder)")
    if kind == "bert":
        return BertTokenizer(name_or_path, max_length)
    return HFCLIPTokenizer(name_or_path, max_length)
