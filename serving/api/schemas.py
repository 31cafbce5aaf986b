"""OpenAI-compatible request bodies, plus the `moa` extension object a client sends as extra_body."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moa.prompts import StrategyName

STRICT = ConfigDict(strict=True)  # JSON types as the schema states them: no "0" for false, no false for 0


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class MoAOptions(BaseModel):
    """Per-request overrides of a pipeline (`extra_body={"moa": {...}}`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    proposers: list[str] | None = Field(default=None, min_length=1)
    aggregator: str | None = None
    layers: int | None = Field(default=None, ge=1, le=8)
    strategy: StrategyName | None = None
    quorum: int | None = Field(default=None, ge=1)
    events: bool = False  # stream progress events as extra chunks (choices: [])
    # Also stream every engine call's text as `call_delta` events (implies events): the playground's columns.
    call_deltas: bool = False
    trace: bool = False  # include every engine call in the response's `moa.trace`
    cache: bool = True  # false: never answer from (or store into) the response cache
    # Spending limit of the run: once it has a first answer, no call that could pass it (moa/calls.py Ceiling).
    max_total_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]


class JSONSchemaFormat(BaseModel):
    model_config = STRICT
    name: str = "output"
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema (guided decoding)."""

    model_config = STRICT
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

    # Clients send fields we do not use (user, logprobs=false, ...); the ones we use are typed strictly.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    n: int = Field(default=1, ge=1, le=16)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    # int64, with room for seed + i over n samples (sample i of a seeded request uses seed + i).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1 - 16)
    # Up to 4 non-empty stop strings, as the schema says (so a schema-valid request is never refused for it).
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Read only to refuse them with a 400 that says so (no function calling here), never silently ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return [value] if isinstance(value, str) else value


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
