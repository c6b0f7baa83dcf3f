"""Tokenizer tests: ids identical to the official tokenizer.json (loaded through HF `tokenizers`,
the reference named by issue 2), official API vectors, and the streaming detokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers

from ds4py.tokenizer import (
    TOKEN_NORMAL,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    default_tokenizer_json,
    vocab_from_tokenizer_json,
)

VECTORS = Path(__file__).parent / "data" / "vectors"

HARD_CORPUS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\t\ttabs\t",
    "line\nbreaks\r\nwindows\rold mac\n\n\n",
    " " * 1 + "x" + " " * 2 + "x" + " " * 3 + "x" + " " * 17 + "x" + " " * 300,
    "    int main() {\n\treturn 0;\n}\n",
    "\n \n\t\n  \r\n \u000b\u000c x \u00a0\u00a0nbsp\u3000ideographic\u2003em",
    "mixed \t \n \t\n\n   \t\t  word",
    "0 12 123 1234 12345 123456789 3.14159 1e-7 -42 0x1F 1_000_000",
    "٣٤٥ ١٢٣ ３４５ ⅷ ² ½",
    "中文分词测试：你好，世界！这是一个句子。",
    "日本語のひらがなとカタカナ、漢字まじり。ｶﾀｶﾅ",
    "한국어 텍스트와 中文 mixed with English",
    "😀 emoji 👍🏽 ZWJ 👨‍👩‍👧‍👦 flags 🇮🇹🇯🇵 keycap 1️⃣ 🫠",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 𠀀𠀁 ext-B",
    "Ελληνικά Русский текст עברית العربية हिन्दी ไทย",
    "combining: e\u0301 a\u0308 \u0301 alone, ZW\u200bSP, BOM\ufeff, RTL\u202emark",
    "replacement \ufffd char and latin-1 ÿþý Ġ Ċ ĉ ł Ń ▁ ｜",
    "ctrl \x00\x01\x02\x1b[31m\x7f del",
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x**2 for _ in range(3)]}  # 注释\n",
    "if (a && b || !c) { x->y = *p++; } // C++ <vector<int>>",
    '<html><body class="x">&amp; &lt;tag&gt; &#x27;</body></html>',
    "SELECT * FROM t WHERE a='b' AND c>=3;",
    '{"key": [1, 2.5, true, null], "nested": {"k": "v\\n"}}',
    "path/to/file.py:123:45 C:\\Users\\name\\file.txt ~/.config",
    "<think>reasoning</think>answer",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>",
    "text<｜end▁of▁sentence｜>more<｜end▁of▁sentence｜>",
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bash">\n</｜DSML｜invoke>',
    "almost <think and <｜User and ｜DSML and </think >",
    "<think><think></think></think>｜DSML｜｜DSML｜",
    "word<think>word｜DSML｜word<｜User｜>word",
    "<|EOT|> <|place_holder_mm_span_0021|> <｜latest_reminder｜><｜action｜>",
    "!!!??? ... --- === +++ *** ### @@@ $$$ %%% ^^^ &&& ((( ))) ___",
    "a.b,c;d:e!f?g\"h'i(j)k[l]m{n}o<p>q/r\\s|t`u~v@w#x$y%z^&*",
    "Mr. O'Neil's dog—it's \"quoted\" … ‘curly’ «guillemets» „low“",
    "x" * 5000,
    "ab " * 2000,
    "\n" * 100 + " " * 100 + "\t" * 100,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.fixture(scope="module")
def ref() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(default_tokenizer_json()))


def _fuzz_corpus(n: int, seed: int) -> list[str]:
    """Random strings over a pool rich in the classes the pre-tokenizer distinguishes."""
    pool = list(" \t\n\r\u000b\u000c\u00a0\u3000") * 4 + list(
        "aZ09_-.,;:!?'\"()[]{}<>/\\|`~@#$%^&*+="
    )
    pool += list("éßøĠĊ▁｜中文日本カナ한😀👍🏽\u200d\u0301٣３")
    pool += [
        "<think>",
        "</think>",
        "｜DSML｜",
        "<｜User｜>",
        "<｜Assistant｜>",
        "1234",
        "word",
        " the",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def _vector_cases() -> list[dict]:
    manifest = json.loads((VECTORS / "manifest.json").read_text())
    return [json.loads((VECTORS / p["official_file"]).read_text()) for p in manifest["prompts"]]


# ---- official tokenizer.json parity ----


def test_pipeline_config_matches_official(tok: Tokenizer) -> None:
    official = json.loads(default_tokenizer_json().read_text(encoding="utf-8"))
    ours = json.loads(tok._hf.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert ours[key] == official[key], key
    assert sorted(t["content"] for t in ours["added_tokens"]) == sorted(
        t["content"] for t in official["added_tokens"]
    )


@pytest.mark.parametrize("text", HARD_CORPUS, ids=range(len(HARD_CORPUS)))
def test_hard_corpus_ids_match_official(tok: Tokenizer, ref: tokenizers.Tokenizer, text: str):
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_fuzz_ids_match_official(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    for text in _fuzz_corpus(400, seed=1234):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, repr(text)
        assert tok.decode(tok.encode(text)) == text


def test_long_prompts_match_official(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    for path in sorted((VECTORS / "prompts").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, path.name


def test_special_ids_match_official(tok: Tokenizer, ref: tokenizers.Tokenizer) -> None:
    named = {
        "<｜begin▁of▁sentence｜>": tok.bos_id,
        "<｜end▁of▁sentence｜>": tok.eos_id,
        "<｜User｜>": tok.user_id,
        "<｜Assistant｜>": tok.assistant_id,
        "<think>": tok.think_id,
        "</think>": tok.end_think_id,
        "｜DSML｜": tok.dsml_id,
    }
    for text, tid in named.items():
        assert tid == ref.token_to_id(text)
        assert tok.encode(text) == [tid]
        assert tok.token_bytes(tid) == text.encode()
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)


def test_plain_encoding_ignores_specials(tok: Tokenizer) -> None:
    official = json.loads(default_tokenizer_json().read_text(encoding="utf-8"))
    official["added_tokens"] = []
    bare = tokenizers.Tokenizer.from_str(json.dumps(official))
    for text in [*HARD_CORPUS, *_fuzz_corpus(100, seed=7)]:
        plain = tok.encode(text, specials=False)
        assert plain == bare.encode(text, add_special_tokens=False).ids
        assert not any(tok.is_added(i) for i in plain)
        assert tok.decode(plain) == text


def test_encode_segments(tok: Tokenizer) -> None:
    parts = [
        ("<｜begin▁of▁sentence｜><｜User｜>", True),
        ("Look:", False),
        ("\n\n<think>x", True),
        ("  trailing spaces", False),
        ("<｜Assistant｜></think>", True),
    ]
    joined = "".join(t for t, _ in parts)
    assert tok.encode_segments(parts) == tok.encode(joined)
    # A special literal in untrusted text is plain BPE; the same literal in trusted text is not.
    hostile = [("<｜User｜>", True), ("a <think> b <｜User｜> ｜DSML｜", False), ("</think>", True)]
    ids = tok.encode_segments(hostile)
    assert ids[0] == tok.user_id and ids[-1] == tok.end_think_id
    assert sum(tok.is_added(i) for i in ids) == 2
    assert tok.decode(ids) == "".join(t for t, _ in hostile)


# ---- vocabulary arrays ----


def test_vocab_arrays_and_type_inference(tok: Tokenizer) -> None:
    tokens, merges, types = vocab_from_tokenizer_json()
    assert len(tokens) == tok.vocab_size and len(types) == len(tokens)
    official = json.loads(default_tokenizer_json().read_text(encoding="utf-8"))
    assert {i for i, t in enumerate(types) if t != TOKEN_NORMAL} == {
        t["id"] for t in official["added_tokens"]
    }
    assert tok.added_ids == {i for i, t in enumerate(types) if t != TOKEN_NORMAL}
    # Without GGUF token types (and with byte strings, as some GGUF readers return them) the
    # added set is inferred from the merges; it must agree.
    inferred = Tokenizer.from_vocab([t.encode() for t in tokens], [m.encode() for m in merges])
    assert inferred.added_ids == tok.added_ids
    sample = HARD_CORPUS[28] + HARD_CORPUS[12]
    assert inferred.encode(sample) == tok.encode(sample)


def test_bad_vocab_errors() -> None:
    byte_chars = [chr(c) for c in range(33, 127)]
    with pytest.raises(TokenizerError, match="special token"):
        Tokenizer.from_vocab(byte_chars, [])
    with pytest.raises(TokenizerError, match="duplicate"):
        Tokenizer.from_vocab(["a", "a"], [])
    with pytest.raises(TokenizerError, match="merge 0"):
        Tokenizer.from_vocab(byte_chars, ["ab"])
    with pytest.raises(TokenizerError, match="token_types"):
        Tokenizer.from_vocab(byte_chars, [], [1])


def test_bad_ids_and_text(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(TokenizerError):
        tok.decode([0, -1])
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ---- official API vectors ----


@pytest.mark.parametrize("case", _vector_cases(), ids=lambda c: c["id"])
def test_official_vectors(tok: Tokenizer, case: dict) -> None:
    # The API's prompt count covers BOS + USER + prompt + ASSISTANT + </think> (thinking disabled).
    prompt = f"<｜begin▁of▁sentence｜><｜User｜>{case['prompt']}<｜Assistant｜></think>"
    assert len(tok.encode(prompt)) == case["usage"]["prompt_tokens"]
    by_bytes = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    selected = [bytes(s["token"]["bytes"]) for s in case["steps"]]
    assert all(b in by_bytes for b in selected)
    # Re-encoding the generated text reproduces the generated token sequence.
    assert [tok.token_bytes(i) for i in tok.encode(case["message"]["content"])] == selected
    for step in case["steps"]:
        for alt in step["top_logprobs"]:
            raw = bytes(alt["token"]["bytes"])
            # The API spells EOS with doubled bars; that is its rendering, not a vocab entry.
            raw = raw.replace("｜｜".encode(), "｜".encode())
            assert raw in by_bytes, alt["token"]
            assert tok.decode([by_bytes[raw]]) == raw.decode("utf-8", errors="replace")


# ---- streaming detokenizer ----


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    sd = tok.stream_decoder()
    return [sd.push(i) for i in ids] + [sd.flush()]


@pytest.mark.parametrize(
    "text", ["😀👍🏽👨‍👩‍👧", "中文日本語カタカナ𠀀", "mixed é ß 😀 中 text", HARD_CORPUS[15]]
)
def test_stream_decoder_never_splits_chars(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    partial = [i for i in ids if not _valid_utf8(tok.token_bytes(i))]
    assert partial, "corpus must contain tokens that end mid-character"
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_byte_tokens(tok: Tokenizer) -> None:
    single = {tok.token_bytes(i): i for i in range(tok.vocab_size) if len(tok.token_bytes(i)) == 1}
    text = "é😀中"
    ids = [single[bytes([b])] for b in text.encode()]
    pieces = _stream(tok, ids)
    assert [p for p in pieces if p] == ["é", "😀", "中"]
    assert pieces[:2] == ["", "é"] and pieces[2:5] == ["", "", ""]


def test_stream_decoder_matches_decode_on_garbage(tok: Tokenizer) -> None:
    rng = random.Random(5)
    byte_ids = [i for i in range(tok.vocab_size) if not _valid_utf8(tok.token_bytes(i))]
    for _ in range(200):
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(300) for _ in range(12)
        ]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
    sd = StreamDecoder(tok)
    assert sd.push_bytes(b"\xe4\xb8") == "" and sd.flush() == "\ufffd"


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
