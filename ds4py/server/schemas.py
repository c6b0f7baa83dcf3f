"""Pydantic request models for the four generation endpoints (they also make the OpenAPI doc).

Models are lenient where the wire protocols are (unknown keys kept, content as string, null or
parts) and strict about types, so a malformed body is a 400 before any work is queued. The
meaning of each field is applied in openai.py, anthropic.py and responses.py, not here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- OpenAI chat / completions ---------------------------------------------------------------


class ContentPart(Loose):
    type: str | None = None
    text: str | None = None


Content = str | list[ContentPart | str] | None


class FunctionCall(Loose):
    name: str | None = None
    arguments: str | dict[str, Any] | None = None


class ChatToolCall(Loose):
    id: str | None = None
    type: str | None = "function"
    function: FunctionCall | None = None


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = "user"
    content: Content = None
    reasoning_content: Content = None
    tool_call_id: str | None = None
    tool_calls: list[ChatToolCall] | None = None


class FunctionDef(Loose):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(Loose):
    type: str = "function"
    function: FunctionDef


class StreamOptions(Loose):
    include_usage: bool | None = None


class ThinkingConfig(Loose):
    type: str
    budget_tokens: int | None = None


class SamplingFields(Loose):
    model: str | None = None
    temperature: Temperature | None = None
    top_p: Finite | None = None
    min_p: Finite | None = None
    top_k: int | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    thinking: bool | ThinkingConfig | None = None
    think: bool | None = None
    reasoning_effort: str | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


# ---- Anthropic Messages ----------------------------------------------------------------------


class AnthropicBlock(Loose):
    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthropicBlock | str] | None = None


class AnthropicMessage(Loose):
    role: Literal["user", "assistant"]
    content: str | list[AnthropicBlock] | None = None


class SystemBlock(Loose):
    type: str | None = "text"
    text: str


class AnthropicTool(Loose):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(Loose):
    type: str


class OutputConfig(Loose):
    effort: str | None = None


class MessagesRequest(Loose):
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[SystemBlock | str] | None = None
    max_tokens: int | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    temperature: Temperature | None = None
    top_p: Finite | None = None
    top_k: int | None = None
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    thinking: bool | ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    reasoning_effort: str | None = None


class CountTokensRequest(Loose):
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[SystemBlock | str] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: bool | ThinkingConfig | None = None
    output_config: OutputConfig | None = None


# ---- OpenAI Responses ------------------------------------------------------------------------


class ReasoningConfig(Loose):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(Loose):
    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = None
    max_tokens: int | None = None
    temperature: Temperature | None = None
    top_p: Finite | None = None
    stream: bool | None = False
    reasoning: ReasoningConfig | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
