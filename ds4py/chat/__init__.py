"""Chat layer: messages -> DeepSeek V4 prompt (`render`), generated text -> message (`parse`).

The prompt text is the official DeepSeek V4 encoding byte for byte (CHAT.md). Tokenize it with
`render_ids`: template markers become special tokens, but special-token literals inside client
text (content, reasoning, tool results and arguments, schemas) stay plain text, so a file or web
page cannot forge turns or tool calls. Ids equal the official pipeline's (encoder + tokenizer.json)
whenever client text spells no special token; `Tokenizer.encode(render(...))` is that pipeline.
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
