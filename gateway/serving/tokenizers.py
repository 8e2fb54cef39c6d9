"""The gateway's own tokenizers: prompt ids and token counts never depend on the backend.

``encode`` treats its input as plain text: a user who types ``</s>`` gets those characters, never the
control token. ``encode_with_special`` parses special-token text and is meant only for text that a
model's own chat template rendered. Neither adds BOS; prompt builders place it where the format wants.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, Self

import sentencepiece
import tokenizers

from gateway.serving.encode_memo import EncodeMemo
from gateway.settings import ConfigError, ModelConfig


class Tokenizer(Protocol):
    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def bos_token(self) -> str: ...

    @property
    def eos_token(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_with_special(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def add_bos(self) -> bool:
        """Whether the model expects BOS before a plain-text prompt (legacy completions)."""
        ...

    @property
    def special_texts(self) -> tuple[str, ...]:
        """The texts that ``encode_with_special`` turns into special tokens, longest first."""
        ...


class SentencePieceTokenizer:
    """A sentencepiece ``tokenizer.model``, as Meta's reference code uses it for Llama 2."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor) -> None:
        self._sp = processor
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.bos_token: str = processor.id_to_piece(self.bos_id)
        self.eos_token: str = processor.id_to_piece(self.eos_id)
        self.vocab_size: int = processor.get_piece_size()
        self.add_bos = True  # Meta's reference encodes every prompt with BOS
        control = [processor.id_to_piece(i) for i in range(self.vocab_size) if processor.is_control(i)]
        self.special_texts: tuple[str, ...] = tuple(sorted((p for p in control if p), key=len, reverse=True))
        # Longest first, so that a control piece which is a prefix of another never wins.
        alternatives = "|".join(re.escape(p) for p in sorted(control, key=len, reverse=True) if p)
        self._control = re.compile(f"({alternatives})") if alternatives else None
        self._memo = EncodeMemo(self._encode)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot load sentencepiece tokenizer {path}: {exc}") from exc
        return cls(processor)

    def encode(self, text: str) -> list[int]:
        return self._memo(text)

    def _encode(self, text: str) -> list[int]:
        # sentencepiece never produces control ids from text, so this is plain-text encoding.
        ids: list[int] = self._sp.encode(text)
        return ids

    def encode_with_special(self, text: str) -> list[int]:
        if self._control is None:
            return self.encode(text)
        # Each text fragment gets its own dummy prefix, as llama.cpp and Hugging Face's legacy Llama
        # tokenizer do after a special token.
        ids: list[int] = []
        for index, fragment in enumerate(self._control.split(text)):
            if index % 2:
                ids.append(self._sp.piece_to_id(fragment))
            elif fragment:
                ids.extend(self.encode(fragment))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._sp.decode(list(ids))
        return text


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a token either as its text or as an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the format ExLlamaV2 and most model repositories ship)."""

    def __init__(self, tokenizer_json: str, bos_token: str, eos_token: str, add_bos: bool = True) -> None:
        self._special = tokenizers.Tokenizer.from_str(tokenizer_json)
        # A second instance, because the switch is per tokenizer object and flipping it per call
        # would race between concurrent requests.
        self._plain = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._plain.encode_special_tokens = True
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        self.vocab_size: int = self._special.get_vocab_size(with_added_tokens=True)
        self.add_bos = add_bos
        added = [t.content for t in self._special.get_added_tokens_decoder().values() if t.content]
        self.special_texts: tuple[str, ...] = tuple(sorted(added, key=len, reverse=True))
        self._memo = EncodeMemo(self._encode)
        self._memo_special = EncodeMemo(self._encode_with_special)

    def _token_id(self, token: str) -> int:
        token_id: int | None = self._special.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"the tokenizer has no token {token!r}")
        return token_id

    @classmethod
    def from_file(cls, tokenizer_json: str | Path, tokenizer_config_json: str | Path | None = None) -> Self:
        try:
            text = Path(tokenizer_json).read_text(encoding="utf-8")
            config: dict[str, Any] = {}
            if tokenizer_config_json is not None:
                config = json.loads(Path(tokenizer_config_json).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read tokenizer file: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{tokenizer_config_json} is not valid JSON: {exc}") from exc
        # Without a tokenizer_config.json, assume the Llama names that tokenizer.json files carry.
        bos = _token_content(config.get("bos_token")) or "<s>"
        eos = _token_content(config.get("eos_token")) or "</s>"
        try:
            return cls(text, bos, eos, add_bos=bool(config.get("add_bos_token", True)))
        except ConfigError:
            raise
        except Exception as exc:  # tokenizers reports a malformed file as a bare Exception
            raise ConfigError(f"cannot load tokenizer {tokenizer_json}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return self._memo(text)

    def encode_with_special(self, text: str) -> list[int]:
        return self._memo_special(text)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self._plain.encode(text, add_special_tokens=False).ids
        return ids

    def _encode_with_special(self, text: str) -> list[int]:
        ids: list[int] = self._special.encode(text, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._special.decode(list(ids), skip_special_tokens=True)
        return text


def _vocab_only(path: Path) -> Any:
    """A llama.cpp model with the vocabulary and metadata of a GGUF file but none of its weights.

    llama.cpp reads these in milliseconds, where gguf.GGUFReader takes seconds on a large vocabulary.
    """
    import llama_cpp

    from backends.llamacpp.log_routing import route_llama_cpp_logs

    route_llama_cpp_logs()
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist")
    try:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as exc:
        raise ConfigError(f"cannot read GGUF file {path}: {exc}") from exc


class GGUFTokenizer:
    """The vocabulary inside a GGUF file, through llama.cpp itself (no weights are loaded)."""

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self._llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.bos_id: int = llm.token_bos()
        self.eos_id: int = llm.token_eos()
        self.bos_token: str = self._piece(self.bos_id)
        self.eos_token: str = self._piece(self.eos_id)
        self.vocab_size: int = llm.n_vocab()
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = [
            self._piece(i) for i in range(self.vocab_size) if llama_cpp.llama_vocab_get_attr(self._vocab, i) & special
        ]
        self.special_texts: tuple[str, ...] = tuple(sorted((t for t in texts if t), key=len, reverse=True))
        self._memo = EncodeMemo(self._encode)
        self._memo_special = EncodeMemo(self._encode_with_special)

    @classmethod
    def from_file(cls, gguf_path: str | Path) -> Self:
        return cls(_vocab_only(Path(gguf_path)))

    def _piece(self, token_id: int) -> str:
        import llama_cpp

        text: bytes = llama_cpp.llama_vocab_get_text(self._vocab, token_id)
        return text.decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return self._memo(text)

    def encode_with_special(self, text: str) -> list[int]:
        return self._memo_special(text)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return ids

    def _encode_with_special(self, text: str) -> list[int]:
        ids: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        import llama_cpp

        # Control tokens render as nothing, but llama.cpp would still let a leading one (BOS) keep the
        # first word's space prefix; dropping them first decodes as sentencepiece and tokenizers do.
        kept = [i for i in ids if not llama_cpp.llama_vocab_is_control(self._vocab, i)]
        tokens = (llama_cpp.llama_token * len(kept))(*kept)
        size = max(16, 8 * len(kept))
        while True:
            buffer = ctypes.create_string_buffer(size)
            written: int = llama_cpp.llama_detokenize(self._vocab, tokens, len(kept), buffer, size, False, False)
            if written >= 0:
                return buffer.raw[:written].decode("utf-8", errors="replace")
            size = -written


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _model_dir(model: ModelConfig) -> Path:
    if model.path is None:
        raise ConfigError(f"model {model.name!r}: set 'path' or 'tokenizer' so the gateway can count tokens")
    weights = Path(model.path)
    return weights if weights.is_dir() else weights.parent


def _hf_tokenizer(tokenizer_json: Path) -> HFTokenizer:
    if not tokenizer_json.is_file():
        raise ConfigError(f"no tokenizer.json at {tokenizer_json}")
    config = tokenizer_json.with_name("tokenizer_config.json")
    return HFTokenizer.from_file(tokenizer_json, config if config.is_file() else None)


def load_tokenizer(model: ModelConfig) -> Tokenizer:
    """The tokenizer that builds ``model``'s prompts and counts its tokens.

    The llama-2 template needs Meta's sentencepiece ``tokenizer.model``. Jinja templates use the
    vocabulary inside a GGUF file, or else ``tokenizer.json`` in the model directory; ``tokenizer``
    in the model's config overrides either (``.gguf``, ``.json`` or a sentencepiece model).
    """
    if model.template == "llama-2":
        path = model.tokenizer_path()
        if path is None or not path.is_file():
            raise ConfigError(
                f"model {model.name!r}: the llama-2 template needs the sentencepiece tokenizer.model;"
                f" none at {path if path is not None else 'an unset path'} (set 'tokenizer' to its location)"
            )
        return SentencePieceTokenizer.from_file(path)
    if model.tokenizer is not None:
        explicit = Path(model.tokenizer)
        if explicit.suffix.lower() == ".gguf":
            return GGUFTokenizer.from_file(explicit)
        if explicit.suffix.lower() == ".json":
            return _hf_tokenizer(explicit)
        return SentencePieceTokenizer.from_file(explicit)
    if model.path is not None and _is_gguf(Path(model.path)):
        return GGUFTokenizer.from_file(model.path)
    return _hf_tokenizer(_model_dir(model) / "tokenizer.json")


def _gguf_chat_template(path: Path) -> str | None:
    template: str | None = _vocab_only(path).metadata.get("tokenizer.chat_template")
    return template


def _config_chat_template(directory: Path) -> str | None:
    standalone = directory / "chat_template.jinja"
    if standalone.is_file():
        return standalone.read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path} is not valid JSON: {exc}") from exc
    # Some repositories ship several named templates; "default" is the one for plain chat.
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_chat_template(model: ModelConfig) -> str | None:
    """The model's own chat template: GGUF metadata, or the files of a Hugging Face model directory."""
    if model.path is not None and _is_gguf(Path(model.path)):
        return _gguf_chat_template(Path(model.path))
    if model.tokenizer is not None and _is_gguf(Path(model.tokenizer)):
        return _gguf_chat_template(Path(model.tokenizer))
    if model.path is None:
        return None
    return _config_chat_template(_model_dir(model))
