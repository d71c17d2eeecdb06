"""`internlm2 generate` (one completion) and `internlm2 chat` (interactive, streaming)."""

from __future__ import annotations

import argparse
import sys

from internlm2_client import InferenceClient
from internlm2_client.cli._common import (
    add_connection_options,
    client_kwargs,
    load_json_arg,
    print_json,
    wants_json,
)
from internlm2_client.types import ChatMessage, GenerateResult, SamplingParams, StructuredOutput


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Flags of SamplingParams; unset flags leave the engine default."""
    g = parser.add_argument_group("sampling (unset = engine default)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument(
        "--stop-token-id",
        action="append",
        type=int,
        dest="stop_token_ids",
        metavar="ID",
        help="stop token id (repeatable; replaces the tokenizer's defaults)",
    )
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--logprobs", type=int, metavar="K", help="return logprobs with K alternatives")
    g.add_argument(
        "--keep-special-tokens",
        action="store_false",
        dest="skip_special_tokens",
        default=None,
        help="keep special tokens in the output text",
    )
    g.add_argument("-n", "--n", type=int, dest="n", help="number of completions (choices) of the prompt")
    g.add_argument("--best-of", type=int, help="sample this many and keep the n most likely (not streamed)")
    so = g.add_mutually_exclusive_group()
    so.add_argument("--json-schema", metavar="JSON|@FILE", help="constrain the output to this JSON schema")
    so.add_argument("--regex", metavar="RE", help="constrain the whole output to match this regular expression")
    so.add_argument("--grammar", metavar="EBNF|@FILE", help="constrain the output to this GBNF grammar (rule root)")
    so.add_argument("--json-object", action="store_true", default=None, help="constrain the output to a JSON object")


def _structured_output(args: argparse.Namespace) -> StructuredOutput | None:
    if getattr(args, "json_schema", None):
        return StructuredOutput(json_schema=load_json_arg(args.json_schema))
    if getattr(args, "regex", None):
        return StructuredOutput(regex=args.regex)
    if getattr(args, "grammar", None):
        grammar = args.grammar
        if grammar.startswith("@"):
            with open(grammar[1:], encoding="utf-8") as f:
                grammar = f.read()
        return StructuredOutput(grammar=grammar)
    if getattr(args, "json_object", None):
        return StructuredOutput(json_object=True)
    return None


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    names = [f for f in vars(SamplingParams()) if f not in ("stop", "prompt_logprobs", "structured_output")]
    params = SamplingParams(**{n: getattr(args, n, None) for n in names})
    params.stop = list(args.stop or [])
    params.structured_output = _structured_output(args)
    return params


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a completion",
        description="Generate a completion of PROMPT (or stdin) with the inference service.",
    )
    p.add_argument("prompt", nargs="?", default="-", help="prompt text; '-' or omitted: read stdin")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    p.add_argument("--system", help="system message (implies --chat)")
    p.add_argument("--tools", metavar="JSON|@FILE", help="tools offered to the model (implies --chat)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="wait for the whole completion")
    p.add_argument("--request-id", default="", help="id for abort and logs")
    add_sampling_options(p)
    add_connection_options(p)
    p.set_defaults(func=run_generate)

    c = subparsers.add_parser(
        "chat",
        help="interactive streaming chat",
        description="Chat with the model; history is kept. Commands: /reset, /exit.",
    )
    c.add_argument("--system", help="system message")
    c.add_argument("--tools", metavar="JSON|@FILE", help="tools offered to the model")
    add_sampling_options(c)
    add_connection_options(c)
    c.set_defaults(func=run_chat)


def _print_tool_calls(result: GenerateResult) -> None:
    for call in result.tool_calls:
        print(f"[tool call {call.kind}] {call.name} {call.arguments_json}", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tools = load_json_arg(args.tools) if args.tools else []
    inputs: dict = {"prompt": prompt}
    if args.chat or args.system or tools:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        inputs = {"messages": [*messages, {"role": "user", "content": prompt}], "tools": tools}
    sampling = sampling_from_args(args)
    with InferenceClient(**client_kwargs(args, "inference")) as client:
        # n > 1 choices would interleave in a stream (and best_of is known only at the end): print them whole.
        if wants_json(args) or not args.stream or (sampling.n or 1) > 1 or sampling.best_of:
            result = client.generate(**inputs, sampling=sampling, request_id=args.request_id)
            if wants_json(args):
                print_json(result)
            elif len(result.choices) > 1:
                for choice in result.choices:
                    print(f"--- choice {choice.index} [{choice.finish_reason}]")
                    print(choice.text)
            else:
                print(result.text)
        else:
            with client.generate_stream(**inputs, sampling=sampling, request_id=args.request_id) as stream:
                for delta in stream:
                    print(delta.text, end="", flush=True)
                result = stream.result()
            print()
        if not wants_json(args):
            _print_tool_calls(result)
            u = result.usage
            print(
                f"[{result.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} new tokens]",
                file=sys.stderr,
            )
    return 0


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def run_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    tools = load_json_arg(args.tools) if args.tools else []
    system = [ChatMessage("system", args.system)] if args.system else []
    history: list[ChatMessage] = list(system)
    sampling = sampling_from_args(args)
    with InferenceClient(**client_kwargs(args, "inference")) as client:
        while (line := _read_line(interactive)) is not None:
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = list(system)
                continue
            history.append(ChatMessage("user", line))
            try:
                with client.generate_stream(messages=history, tools=tools, sampling=sampling) as stream:
                    if not wants_json(args):
                        print("assistant> " if interactive else "", end="", flush=True)
                    for delta in stream:
                        if not wants_json(args):
                            print(delta.text, end="", flush=True)
                    result = stream.result()
            except KeyboardInterrupt:  # stop this answer, keep chatting
                history.pop()
                print("\n[interrupted]", file=sys.stderr)
                continue
            if wants_json(args):
                print_json(result)
            else:
                print()
                _print_tool_calls(result)
            history.append(result.as_message())
    return 0
