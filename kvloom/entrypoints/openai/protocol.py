"""Request and response schemas of the OpenAI-compatible API (OpenAI + vLLM field names).

Scalars are strict where a silent coercion would hide a client bug (``"max_tokens":
true`` or ``"n": "2"`` is a 400, not 1 or 2); floats still accept integers. Unknown
fields are ignored, as OpenAI's own SDK sends fields a server may not know.

Only the request's shape is checked here, and text everywhere (a lone surrogate,
valid in JSON as ``"\\ud800"``, is a 400 naming the field); value ranges are
SamplingParams' and the input processor's, shared with the offline API.

The sampling fields both endpoints share are built from SamplingParams' declaration
(``OPENAI_SHARED_FIELDS``): its type made strict, its default, its help as the
field's description.
"""

from __future__ import annotations

import time
import types
import typing
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, AllowInfNan, BaseModel, ConfigDict, Field, Strict,
                      StringConstraints, ValidationInfo, create_model, model_validator)

from kvloom.sampling_params import (OPENAI_SHARED_FIELDS, SAMPLING_FIELDS, SamplingField,
                                    check_text)

# Identifiers (model, user, role, name) are echoed into logs, templates and errors;
# none needs more.
MAX_NAME_CHARS = 1024


def _valid_text(value: str, info: ValidationInfo) -> str:
    return check_text((info.field_name or "text").rstrip("_"), value)  # json_ is "json"


Int = Annotated[int, Strict()]
# NaN and infinities (Python's JSON reads them) are refused as such, not by a range check
# that would say "should be less than or equal to 2" of NaN.
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict(), AfterValidator(_valid_text)]
Name = Annotated[str, Strict(), StringConstraints(max_length=MAX_NAME_CHARS),
                 AfterValidator(_valid_text)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False


class JsonSchemaFormat(OpenAIModel):
    """OpenAI's ``response_format.json_schema``; ``name`` and ``strict`` change nothing
    (the schema is always enforced)."""

    name: Name | None = None
    description: Str | None = None
    # Aliased: a field named "schema" would shadow BaseModel.schema.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")


class StructuredOutputsRequest(BaseModel):
    """vLLM's ``structured_outputs`` extra-body field; set exactly one key.

    Unknown keys are an error rather than ignored (unlike the request's other fields):
    a misspelt constraint would otherwise silently produce unconstrained output.
    """

    # Aliased: a field named "json" would shadow BaseModel.json.
    json_: dict[str, Any] | Str | None = Field(default=None, alias="json")
    regex: Str | None = None
    choice: list[Str] | None = Field(default=None, min_length=1)
    grammar: Str | None = None
    json_object: Bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(STRUCTURED_OUTPUTS_KEYS))
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected "
                                 f"one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}")
        return data


_STRICT_TYPES = {int: Int, float: Float, bool: Bool, str: Str}


def _strict(annotation: Any) -> Any:
    """``annotation`` with every scalar in it strict (Int, Float, Bool, Str), as the
    hand-written fields are."""
    if annotation in _STRICT_TYPES:
        return _STRICT_TYPES[annotation]
    if annotation is type(None):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return list[_strict(args[0])]
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict(arg) for arg in args)]
    raise TypeError(f"no request type for {annotation!r}: declare the SamplingParams field "
                    "with openai_own_shape and write its request field in protocol.py")


def _shared_sampling_field(declared: SamplingField) -> tuple[Any, Any]:
    """The request field (type, FieldInfo) of a field both endpoints copy as it is."""
    annotation, default = _strict(declared.type), declared.default
    if declared.openai_null_default:  # null: SamplingParams' default applies
        annotation, default = Optional[annotation], None
    return annotation, Field(default=default, le=declared.openai_high,
                             description=declared.help)


class _RequestHead(OpenAIModel):
    """The shared fields that come first (the OpenAPI schema's order)."""

    model: Name | None = None
    max_tokens: Int | None = None


_SharedSamplingParams = create_model(
    "SharedSamplingParams", __base__=_RequestHead, __module__=__name__,
    **{request_name: _shared_sampling_field(SAMPLING_FIELDS[name])
       for name, request_name in OPENAI_SHARED_FIELDS.items()})


class SamplingFields(_SharedSamplingParams):
    """Fields shared by /v1/completions and /v1/chat/completions: model and max_tokens,
    SamplingParams' ``OPENAI_SHARED_FIELDS`` (built from its declaration), then these."""

    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's: isolates this request's prefix-cache blocks (checked by the input processor).
    cache_salt: Str | None = None
    # OpenAI's and vLLM's fields that kvloom does not act on yet: declared so that a value
    # that would change the answer gets a 400 naming the field instead of being ignored
    # (validation.UNSUPPORTED_FIELDS says which values change nothing).
    logit_bias: Any = None
    best_of: Any = None
    use_beam_search: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    prompt_logprobs: Any = None
    truncate_prompt_tokens: Any = None


# A prompt: text, a list of one text, token ids, or a list of one token-id list.
PromptInput = Union[Str, list[Str], list[Int], list[list[Int]]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    logprobs: Int | None = None
    echo: Bool = False
    max_tokens: Int | None = 16  # OpenAI's legacy default
    suffix: Any = None  # not supported yet (validation.UNSUPPORTED_FIELDS)


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: Str


class ChatMessage(OpenAIModel):
    role: Name
    content: Str | list[TextContentPart] | None = None
    name: Name | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: Bool = True
    tools: Any = None  # not supported yet (validation.UNSUPPORTED_FIELDS)
    tool_choice: Any = None


class TokenizeRequest(OpenAIModel):
    model: Name | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: Bool = True


class DetokenizeRequest(OpenAIModel):
    model: Name | None = None
    tokens: list[Int]


# ------------------------------------------------------------------ responses
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvloom"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON-ready data (``usage: null`` kept, as OpenAI sends it)."""
    return model.model_dump(mode="json")
