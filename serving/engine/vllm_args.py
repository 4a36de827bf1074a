"""Turn a ModelConfig into the argument namespace `vllm serve` would build.

Values go through vLLM's own `vllm serve` argument parser, so names, types, choices and the
post-processing vLLM does on them are exactly vLLM's. Imports vllm: never import this module from
the gateway.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from typing import Any

from serving.config import ModelConfig, suggest


class _ArgumentError(ValueError):
    pass


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str):  # argparse would exit the process
            raise _ArgumentError(message)

    return make_arg_parser(Parser(prog="vllm serve"))


@functools.lru_cache(maxsize=1)
def _actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in _parser()._actions if a.option_strings}


@functools.lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_"))


@functools.lru_cache(maxsize=1)
def server_arg_names() -> frozenset[str]:
    return frozenset(_actions()) - engine_arg_names() - {"help", "model"}


def _tokens(dest: str, value: Any) -> list[str]:
    """CLI tokens that make vLLM's parser set `dest` to `value`."""
    action = _actions()[dest]
    longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
    flag = max(longs or action.option_strings, key=len)
    if action.nargs == 0 and not isinstance(value, bool):
        raise ValueError(f"expects true or false, not {value!r}")
    if isinstance(value, bool):
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        if action.nargs == 0:  # store_true / store_false
            return [flag] if value != action.default else []
        return [flag, str(value).lower()]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, (list, tuple)):
        if action.nargs in (None, "?"):
            return [flag, json.dumps(value)]
        return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
    return [flag, str(value)]


_KINDS = {"engine_args": "vLLM engine argument", "server_args": "vLLM OpenAI-server option"}
_MOVE = {"engine_args": "an engine argument: move it to engine_args",
         "server_args": "a server option: move it to server_args"}


def _check_names(model: ModelConfig, where: str) -> list[str]:
    problems = []
    names = {"engine_args": engine_arg_names(), "server_args": server_arg_names()}
    for field, other in (("engine_args", "server_args"), ("server_args", "engine_args")):
        for name in getattr(model, field):
            if name in names[field]:
                continue
            if name in names[other]:
                hint = f" (it is {_MOVE[other]})"
            else:
                hint = suggest(name, set(names[field]))
            problems.append(f"{where}.{field}.{name} (model {model.name!r}): unknown {_KINDS[field]}{hint}")
    return problems


def _base_argv(model: ModelConfig) -> list[str]:
    argv = ["--model", model.source, "--served-model-name", model.name]
    if model.revision:
        argv += ["--revision", model.revision]
    if model.lora_adapters or model.runtime_adapters:
        argv += ["--enable-lora"]
    if model.lora_adapters:
        argv += ["--lora-modules", *(f"{k}={v}" for k, v in model.lora_adapters.items())]
    if model.kind == "embed":
        argv += ["--runner", "pooling"]
    if model.batches:  # batch lines run at a lower priority than interactive requests (serving.gateway.batches)
        argv += ["--scheduling-policy", "priority"]
    return argv


def _field_tokens(model: ModelConfig) -> list[tuple[str, list[str]]]:
    """(`engine_args.name`, tokens) for every non-null value; raises ValueError naming the field."""
    out = []
    for field in ("engine_args", "server_args"):
        for name, value in getattr(model, field).items():
            if value is None:
                continue
            try:
                out.append((f"{field}.{name}", _tokens(name, value)))
            except ValueError as exc:
                raise ValueError(f"{field}.{name}: {exc}") from exc
    return out


def serve_argv(model: ModelConfig) -> tuple[list[str], list[str]]:
    """The `vllm serve` command line for one model, and the names explicitly set to null."""
    problems = _check_names(model, "models[?]")
    if problems:
        raise ValueError("; ".join(problems))
    argv = _base_argv(model)
    for _, tokens in _field_tokens(model):
        argv += tokens
    nulls = [n for f in ("engine_args", "server_args") for n, v in getattr(model, f).items() if v is None]
    return argv, nulls


def _parse(argv: list[str], model: ModelConfig) -> argparse.Namespace:
    try:
        return _parser().parse_args(argv)
    except _ArgumentError as exc:
        # name the configuration field rather than the vLLM flag: find the value the parser refuses
        base = _base_argv(model)
        for path, tokens in _field_tokens(model):
            try:
                _parser().parse_args(base + tokens)
            except _ArgumentError as single:
                raise ValueError(f"{path}: {single}") from exc
        raise ValueError(str(exc)) from exc


def build_namespace(model: ModelConfig) -> argparse.Namespace:
    """The parsed `vllm serve` arguments for one model. Raises ValueError naming the bad field."""
    argv, nulls = serve_argv(model)
    ns = _parse(argv, model)
    for name in nulls:
        setattr(ns, name, None)
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(ns)
    _check_parsers(ns)
    return ns


def _check_parsers(ns: argparse.Namespace) -> None:
    """vLLM looks parser names up only when the server starts; fail at configuration time instead."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for name, value, manager in (
        ("server_args.tool_call_parser", ns.tool_call_parser, ToolParserManager),
        ("engine_args.reasoning_parser", getattr(ns, "reasoning_parser", None), ReasoningParserManager),
    ):
        if value and not getattr(ns, "tool_parser_plugin", None):
            known = set(manager.list_registered())
            if value not in known:
                raise ValueError(f"{name}: unknown parser {value!r}{suggest(value, known)}")


def check_vllm_names(model: ModelConfig, where: str) -> list[str]:
    """Problems with a model's vLLM arguments, each naming its path; empty when it would start."""
    problems = _check_names(model, where)
    if problems:
        return problems
    try:
        build_namespace(model)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if message.startswith(("engine_args.", "server_args.")):
            path, _, reason = message.partition(": ")
            return [f"{where}.{path} (model {model.name!r}): {reason}"]
        return [f"{where} (model {model.name!r}): {message}"]
    return []
