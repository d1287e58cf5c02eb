"""Tokenizer: text <-> token ids, streaming detokenisation and chat templates.

A thin wrapper over `tokenizers.Tokenizer`, built either from a Hugging Face checkpoint directory
(tokenizer.json + tokenizer_config.json) or from the metadata of a GGUF file, where llama.cpp stores the
vocabulary, the merges and the name of the pre-tokenizer instead of a tokenizer.json.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError, InputError, UnsupportedModelError

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre` value, as llama.cpp (llama-vocab.cpp) splits text
# before BPE. Merges were learned on text split this way, so a different split gives different ids.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's split is built into ByteLevel(use_regex=True); these types put every digit on its own first
# (llama.cpp's "\p{N}" expression; SmolLM's tokenizer.json does the same with Digits(individual_digits)).
_GPT2_PRE = ("default", "gpt2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_REGEX_PRE = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# llama.cpp looks whole pre-tokens up in the vocabulary before merging for the Llama-3 family
# (tokenizer.json's "ignore_merges": true).
_IGNORE_MERGES_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")

_GGUF_CONTROL = 3        # llama.cpp token_type for special tokens like <|im_end|>
_GGUF_USER_DEFINED = 4   # added tokens that must stay whole but are not special


class Tokenizer:
    def __init__(self, tok: HFTokenizer, *, bos_token_id: int | None = None, eos_token_ids: tuple[int, ...] = (),
                 add_bos_token: bool = False, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))  # ordered, without duplicates
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._token(bos_token_id)
        self.eos_token = eos_token if eos_token is not None else self._token(self.eos_token_ids[0] if self.eos_token_ids else None)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # ---- Encoding and decoding ---------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json's post-processor may already add BOS; add it only where it is missing, and never
        # twice when the text (e.g. a rendered chat template) already starts with it.
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- Chat template ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        if not self.chat_template:
            raise InputError("this model's tokenizer has no chat template; pass a plain prompt instead")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    # ---- Constructors -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"{tj} not found: a checkpoint directory needs a tokenizer.json "
                                  "(save it with AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise CheckpointError(f"{tj} could not be read ({e}); re-download or re-save the tokenizer") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")

        bos = _token_text(cfg.get("bos_token"))
        bos_id = tok.token_to_id(bos) if bos is not None else None
        eos_ids: list[int] = []
        eos = _token_text(cfg.get("eos_token"))
        if eos is not None and tok.token_to_id(eos) is not None:
            eos_ids.append(tok.token_to_id(eos))
        # Instruct models often list extra stop ids (e.g. Llama-3's <|eot_id|>) only in generation_config.json.
        gen_eos = gen.get("eos_token_id")
        eos_ids += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])

        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it as its own file
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, bos_token_id=bos_id, eos_token_ids=tuple(int(e) for e in eos_ids),
                   add_bos_token=bool(cfg.get("add_bos_token", False)), chat_template=template,
                   bos_token=bos, eos_token=eos)

    @classmethod
    def from_gguf_metadata(cls, reader) -> "Tokenizer":
        """Byte-level BPE from a `gguf.GGUFReader`'s `tokenizer.ggml.*` fields."""
        meta = lambda key, default=None: gguf_field(reader, key, default)  # noqa: E731
        kind = meta("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer.ggml.model={kind!r:.80} is not supported (only byte-level BPE, 'gpt2')")
        pre = meta("tokenizer.ggml.pre", "default")
        tokens = meta("tokenizer.ggml.tokens")
        merges = meta("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise CheckpointError("GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
        # the tokenizers library panics (an exception outside Exception) on some malformed inputs: check first
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) and len(set(tokens)) == len(tokens)):
            raise CheckpointError("GGUF tokenizer.ggml.tokens must be a list of distinct strings; the file is corrupt")
        if not (isinstance(merges, list) and all(isinstance(m, str) and len(m.split(" ", 1)) == 2 for m in merges)):
            raise CheckpointError("GGUF tokenizer.ggml.merges must be a list of 'a b' strings; the file is corrupt")
        if not (isinstance(types, list) and len(types) == len(tokens) and all(isinstance(t, int) for t in types)):
            raise CheckpointError("GGUF tokenizer.ggml.token_type must list one integer per token; the file is corrupt")
        if not isinstance(pre, str):
            raise CheckpointError(f"GGUF tokenizer.ggml.pre={pre!r:.80} must be a string; the file is corrupt")
        for key in ("bos", "eos", "eot", "eom"):
            value = meta(f"tokenizer.ggml.{key}_token_id")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens)):
                raise CheckpointError(f"GGUF tokenizer.ggml.{key}_token_id={value!r:.80} is not a token id of the "
                                      f"{len(tokens)}-token vocabulary; the file is corrupt")
        template = meta("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise CheckpointError("GGUF tokenizer.chat_template must be a string; the file is corrupt")

        try:
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=[tuple(m.split(" ", 1)) for m in merges],
                             ignore_merges=pre in _IGNORE_MERGES_PRE)
        except Exception as e:   # the tokenizers library's own error type is a plain Exception
            raise CheckpointError(f"GGUF tokenizer cannot be built ({str(e)[:200]}); the file is corrupt") from None
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])

        eos_ids = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(tok, bos_token_id=meta("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=tuple(int(e) for e in eos_ids if e is not None),
                   add_bos_token=bool(meta("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta("tokenizer.chat_template"))


class StreamDecoder:
    """Turns a stream of token ids into text pieces, one call per token.

    A byte-level token can end inside a multi-byte UTF-8 character, and decoding a token alone can
    drop the space a word-initial token carries, so each piece is the difference between decoding a
    short window of recent tokens with and without the new ones; text is held back while it ends in
    an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0   # start of the window decoded for context
        self._read = 0     # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing printable yet: wait for the rest of the character
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


# ---- Helpers ---------------------------------------------------------------------------------
def _gguf_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _REGEX_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = sorted(_GPT2_PRE + _DIGITS_THEN_GPT2_PRE + tuple(_REGEX_PRE))
    raise UnsupportedModelError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: {', '.join(known)}")


def gguf_field(reader, key: str, default=None):
    """One metadata value of a `gguf.GGUFReader`, as a Python value."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:   # decoded on demand: a corrupt string or array surfaces only here
        return field.contents()
    except (ValueError, IndexError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"GGUF metadata {key!r} cannot be read ({type(e).__name__}); the file is corrupt "
                              "(re-download it)") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save it") from None


def _token_text(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


_TEMPLATES: dict[str, Any] = {}


def _compile_template(source: str):
    """Renders in a sandbox (chat templates ship with checkpoints and are untrusted code), with the
    helpers and whitespace settings transformers gives templates, so prompts come out byte-identical."""
    if source not in _TEMPLATES:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
