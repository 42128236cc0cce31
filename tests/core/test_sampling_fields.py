"""A sampling parameter is declared in one place, SamplingParams' field (its SamplingField
metadata), and every place that lists sampling parameters agrees with that declaration:
the OpenAI request models, the mapping of requests onto SamplingParams, the server's
error params, the ``kvloom generate`` flags, the runner's per-row tensors and the
SamplingMetadata a sampler plugin reads."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from kvloom.entrypoints.openai import errors, validation
from kvloom.entrypoints.openai import protocol as p
from kvloom.interfaces.sampler import SamplingMetadata
from kvloom.sampling_params import (OPENAI_REQUEST_NAMES, OPENAI_SHARED_FIELDS,
                                    PER_ROW_FLOAT_FIELDS, PER_ROW_INT_FIELDS, SAMPLING_FIELDS,
                                    SamplingField, SamplingParams, _check_declaration,
                                    cli_sampling_fields)

REQUEST_MODELS = (p.CompletionRequest, p.ChatCompletionRequest)


def valid_non_default(declared: SamplingField) -> object:
    """A value in the field's range (and OpenAI's) that is not its default."""
    kind = declared.number_type
    if kind is bool:
        return not declared.default
    if kind in (int, float):
        high = min(declared.high, declared.openai_high or declared.high)
        if kind is int:
            value = max(int(declared.low), 1) + 1
        else:  # a quarter of the way up: inside an open bound too
            value = declared.low + (high - declared.low) / 4
        assert declared.low <= value <= high and value != declared.default
        return value
    return {"stop": ["###"], "stop_token_ids": [3, 5]}[declared.name]


# ------------------------------------------------------------------ the declaration
def test_every_field_is_declared():
    init_fields = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
    assert list(SAMPLING_FIELDS) == init_fields
    defaults = SamplingParams()
    for name, declared in SAMPLING_FIELDS.items():
        assert declared.name == name and declared.help
        assert getattr(defaults, name) == declared.default


def test_every_number_is_bounded_and_checked():
    for declared in SAMPLING_FIELDS.values():
        if declared.number_type not in (int, float):
            continue
        too_high = declared.high + 1 if declared.number_type is int else declared.high * 2 + 1
        with pytest.raises(ValueError) as excinfo:
            SamplingParams(**{declared.name: too_high})
        assert str(excinfo.value).startswith(declared.name + " ")


@pytest.mark.parametrize("declaration, message", [
    (SamplingField("a float", name="top_a", type=float), "declares no range"),
    (SamplingField("a list", name="bias", type=list[int], cli=True), "only numbers"),
    (SamplingField("maybe", name="top_a", type=float | None, low=0.0, high=1.0,
                   per_row=True), "never None"),
])
def test_a_declaration_the_derived_places_cannot_use_is_refused(declaration, message):
    with pytest.raises(TypeError, match=message):
        _check_declaration(declaration)


# ------------------------------------------------------------------ the OpenAI server
@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda model: model.__name__)
def test_both_request_models_have_every_declared_request_field(model):
    for name, request_name in OPENAI_REQUEST_NAMES.items():
        assert request_name in model.model_fields, f"{model.__name__} lacks {request_name}"
    for name, request_name in OPENAI_SHARED_FIELDS.items():
        declared, built = SAMPLING_FIELDS[name], model.model_fields[request_name]
        expected = None if declared.openai_null_default else declared.default
        assert built.default == expected, name
        assert built.description == declared.help


def test_the_shared_request_fields_are_the_declared_ones():
    shared = {name for name, declared in SAMPLING_FIELDS.items()
              if declared.openai and not declared.openai_own_shape}
    assert set(OPENAI_SHARED_FIELDS) == shared
    assert set(OPENAI_SHARED_FIELDS) <= set(OPENAI_REQUEST_NAMES)


def test_request_fields_are_strict_and_keep_openai_ranges():
    with pytest.raises(ValueError, match="temperature"):
        p.CompletionRequest(prompt="x", temperature=2.5)  # OpenAI's range, not the engine's
    with pytest.raises(ValueError, match="n"):
        p.CompletionRequest(prompt="x", n="2")
    body = p.CompletionRequest(prompt="x", temperature=1)  # floats still take integers
    assert body.temperature == 1.0


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda model: model.__name__)
def test_the_server_copies_every_shared_field_into_sampling_params(model):
    values = {name: valid_non_default(SAMPLING_FIELDS[name]) for name in OPENAI_SHARED_FIELDS}
    start = {"prompt": "x"} if model is p.CompletionRequest else {
        "messages": [{"role": "user", "content": "x"}]}
    body = model(**start, **{OPENAI_SHARED_FIELDS[name]: value for name, value in values.items()})
    params = validation.sampling_params(body, max_tokens=16, logprobs=None)
    for name, value in values.items():
        assert getattr(params, name) == value, name


def test_unset_request_fields_keep_sampling_params_defaults():
    body = p.CompletionRequest(prompt="x")
    params = validation.sampling_params(body, max_tokens=16, logprobs=None)
    defaults = SamplingParams()
    for name in OPENAI_SHARED_FIELDS:
        assert getattr(params, name) == getattr(defaults, name), name


def test_every_request_field_is_a_known_error_param():
    for name, request_name in OPENAI_REQUEST_NAMES.items():
        assert errors.param_of_value_error(f"{name} must be something") == request_name
    assert errors.param_of_value_error("output_kind is not a request field") is None


# ------------------------------------------------------------------ the CLI
def generate_parser() -> argparse.ArgumentParser:
    from kvloom.entrypoints.cli_generate import add_generate_parser

    commands = argparse.ArgumentParser().add_subparsers()
    add_generate_parser(commands)
    return commands.choices["generate"]


def test_cli_has_a_flag_for_every_declared_cli_field():
    declared_flags = cli_sampling_fields()
    assert [name for name, _, _ in declared_flags] == [
        name for name, declared in SAMPLING_FIELDS.items() if declared.cli]
    actions = {action.dest: action for action in generate_parser()._actions}
    for name, kind, _ in declared_flags:
        assert name in actions, f"kvloom generate has no --{name.replace('_', '-')}"
        assert actions[name].type is kind, name
        assert actions[name].option_strings == [f"--{name.replace('_', '-')}"]


def test_cli_flags_reach_sampling_params():
    from kvloom.entrypoints.cli_generate import sampling_params_from_args

    values = {name: valid_non_default(SAMPLING_FIELDS[name]) for name, _, _ in
              cli_sampling_fields()}
    values["min_tokens"] = min(values["min_tokens"], values["max_tokens"])
    argv = ["prompt"]
    for name, value in values.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    params = sampling_params_from_args(generate_parser().parse_args(argv))
    for name, value in values.items():
        assert getattr(params, name) == value, name


# ------------------------------------------------------------------ the sampler
def test_sampling_metadata_has_a_tensor_for_every_per_row_field():
    tensors = [f.name for f in dataclasses.fields(SamplingMetadata) if f.type == "torch.Tensor"]
    assert set(tensors) == set(PER_ROW_FLOAT_FIELDS) | set(PER_ROW_INT_FIELDS)
    assert set(PER_ROW_FLOAT_FIELDS).isdisjoint(PER_ROW_INT_FIELDS)
    for name in tensors:  # documented for plugin authors
        assert name in SamplingMetadata.__doc__, name


def test_the_runner_fills_every_per_row_field():
    from kvloom.step.scheduler_output import ScheduledRequest
    from kvloom.worker.sampling import SamplingState

    rows_params = [SamplingParams(), SamplingParams(**{
        name: valid_non_default(SAMPLING_FIELDS[name])
        for name in (*PER_ROW_FLOAT_FIELDS, *PER_ROW_INT_FIELDS)})]
    rows = [ScheduledRequest(request_id=str(index), token_ids=[1], num_computed_tokens=0,
                             block_ids=[0], sample=True, sampling_params=params,
                             prompt_token_ids=[1], output_token_ids=[])
            for index, params in enumerate(rows_params)]
    metadata = SamplingState(torch.device("cpu")).metadata_for(rows)
    for names, dtype in ((PER_ROW_FLOAT_FIELDS, torch.float32),
                         (PER_ROW_INT_FIELDS, torch.int64)):
        for name in names:
            column = getattr(metadata, name)
            assert column.dtype == dtype and column.shape == (2,), name
            expected = [getattr(params, name) for params in rows_params]
            assert column.tolist() == pytest.approx(expected, rel=1e-6), name  # float32
