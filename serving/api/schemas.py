"""OpenAI-compatible request bodies, plus the `moa` extension object a client sends as extra_body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moa.prompts import StrategyName


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class MoAOptions(BaseModel):
    """Per-request overrides of a pipeline (`extra_body={"moa": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    proposers: list[str] | None = Field(default=None, min_length=1)
    aggregator: str | None = None
    layers: int | None = Field(default=None, ge=1, le=8)
    strategy: StrategyName | None = None
    quorum: int | None = Field(default=None, ge=1)
    events: bool = False  # stream progress events as extra chunks (choices: [])
    trace: bool = False  # include every engine call in the response's `moa.trace`
    cache: bool = True  # false: never answer from (or store into) the response cache
    # Spending limit of the run: once it has a first answer, no call that could pass it (moa/calls.py Ceiling).
    max_total_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = "output"
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema (guided decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def schema_or_none(self) -> dict | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        return (self.json_schema or JSONSchemaFormat()).schema_


class _Sampling(BaseModel):
    """Fields both OpenAI endpoints share, validated the same way."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=false, ...)

    model: str
    n: int = Field(default=1, ge=1, le=16)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Read only to refuse them with a 400 that says so (no function calling here), never silently ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        values = [value] if isinstance(value, str) else value
        if len(values) > 4 or any(not v for v in values):
            raise ValueError("stop takes up to 4 non-empty strings")
        return values


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    moa: MoAOptions | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    """/v1/completions: a raw prompt to a base model (no chat template)."""

    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)

    def token_limit(self) -> int:
        return self.max_tokens
