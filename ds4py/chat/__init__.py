"""Chat layer: messages -> DeepSeek V4 prompt (`render`), generated text -> message (`parse`).

The prompt is the official DeepSeek V4 encoding byte for byte (CHAT.md). `render_ids` is how
the engine should tokenize it: template markers become special tokens, while special-token
literals inside client text (user/system/tool content, reasoning, tool arguments, schemas) are
encoded as plain text. The official pipeline (encoder + tokenizer.json) would turn a literal
`<think>` or `<｜User｜>` in a user message or a tool result into the control token itself, which
lets a file or web page forge turns or tool calls; we keep the official text and the official
ids for all ordinary content and differ only where client text spells a special token.
`Tokenizer.encode(render(...))` still gives the official behaviour when that is wanted.
"""

from ds4py.chat.dsml import (
    ContentDelta,
    DsmlError,
    Event,
    MalformedDsml,
    ParsedMessage,
    ReasoningDelta,
    ReasoningEnd,
    StreamParser,
    ToolCall,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallsDone,
    ToolCallStart,
    collect,
    encode_tool_calls,
    iter_events,
    parse,
    render_tools,
)
from ds4py.chat.template import (
    THINK_MAX_MIN_CTX,
    THINK_MAX_PREFIX,
    ChatFormatError,
    call_arguments,
    render,
    render_ids,
    render_segments,
)

__all__ = [
    "THINK_MAX_MIN_CTX",
    "THINK_MAX_PREFIX",
    "ChatFormatError",
    "ContentDelta",
    "DsmlError",
    "Event",
    "MalformedDsml",
    "ParsedMessage",
    "ReasoningDelta",
    "ReasoningEnd",
    "StreamParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "ToolCallsDone",
    "call_arguments",
    "collect",
    "encode_tool_calls",
    "iter_events",
    "parse",
    "render",
    "render_ids",
    "render_segments",
    "render_tools",
]
