"""The byte tokenizer as Hugging Face ``tokenizer.json`` + ``tokenizer_config.json``.

sessa_jax's byte layout (``sessa_jax/data/tokenizer.py``): 0 <pad>, 1 <bos>, 2 <eos>, byte b ->
id b + 3. Written as a `tokenizers` BPE model with no merges over the 256 byte symbols, behind a
byte-level pre-tokenizer (so every UTF-8 byte is one token), with <bos> prepended as
``scripts/generate.py`` does. ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``
(the flag because it reads config.json, whose auto_map names the model code) then encodes and
decodes exactly like ByteTokenizer. Plain JSON: writing it needs no tokenizers package.
"""

from __future__ import annotations

import json

SPECIALS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
OFFSET = 3


def byte_symbols() -> list[str]:
    """The printable character the byte-level pre-tokenizer uses for each byte 0..255.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved,
    in order, to code points 256, 257, ... so that every byte has a visible, unique symbol.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(
        range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_byte_tokenizer(out_dir: str) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json (plus special_tokens_map.json)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({sym: b + OFFSET for b, sym in enumerate(byte_symbols())})
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(SPECIALS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [1], "tokens": ["<bos>"]}},
        },
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    names = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "clean_up_tokenization_spaces": False, "add_bos_token": True, **names}
    files = {"tokenizer.json": spec, "tokenizer_config.json": config,
             "special_tokens_map.json": names}
    from sessa_jax.paths import user_path

    for name, obj in files.items():
        (user_path(out_dir) / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False),
                                               encoding="utf-8")
    return list(files)
