"""`internlm2 tokenize`: encode, decode, count, chat-template, tokenizer info."""

from __future__ import annotations

import argparse
import re
import sys

from internlm2_client import TokenizerClient
from internlm2_client.cli._common import (
    add_connection_options,
    client_kwargs,
    load_json_arg,
    print_json,
    wants_json,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="tokenize, detokenize or count tokens",
        description="Encode TEXT... (or stdin) --decode turns ids back into text.",
    )
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to encode ('-' or none: stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true", help="TEXT are token ids ('1 2 3' or '1,2,3'): decode them")
    mode.add_argument("--count", action="store_true", help="print token counts only")
    mode.add_argument("--chat", metavar="JSON|@FILE", help="render a list of chat messages with the chat template")
    mode.add_argument("--info", action="store_true", help="print vocabulary size, special tokens, chat template")
    p.add_argument("--pieces", action="store_true", help="also print the SentencePiece pieces")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", default=None, help="do not prepend <s>")
    p.add_argument(
        "--keep-special-tokens",
        dest="skip_special_tokens",
        action="store_false",
        default=None,
        help="(--decode) keep special tokens in the text",
    )
    add_connection_options(p)
    p.set_defaults(func=run)


def _texts(args: argparse.Namespace) -> list[str]:
    if not args.texts or args.texts == ["-"]:
        return [sys.stdin.read()]
    return list(args.texts)


def run(args: argparse.Namespace) -> int:
    as_json = wants_json(args)
    with TokenizerClient(**client_kwargs(args, "tokenizer")) as client:
        if args.info:
            info = client.info()
            if as_json:
                print_json(info)
            else:
                print(
                    f"vocab_size: {info.vocab_size}\n"
                    f"bos/eos/pad/unk: {info.bos_token_id}/{info.eos_token_id}/"
                    f"{info.pad_token_id}/{info.unk_token_id}\nstop ids: {list(info.default_stop_token_ids)}"
                )
                for content, token_id in sorted(info.special_tokens.items(), key=lambda kv: kv[1]):
                    print(f"  {token_id:>6}  {content}")
            return 0
        if args.chat:
            rendered = client.apply_chat_template(load_json_arg(args.chat))
            print_json(rendered) if as_json else print(f"{rendered.text}\n{list(rendered.token_ids)}")
            return 0
        if args.decode:
            seqs = [[int(x) for x in re.split(r"[,\s]+", text.strip()) if x] for text in _texts(args)]
            texts = client.detokenize(seqs, skip_special_tokens=args.skip_special_tokens)
            print_json(texts) if as_json else print("\n".join(texts))
            return 0
        if args.count:
            counts = client.count_tokens(_texts(args), add_bos=args.add_bos)
            print_json(counts) if as_json else print("\n".join(str(c) for c in counts.text_counts))
            return 0
        results = client.tokenize(_texts(args), add_bos=args.add_bos, return_pieces=args.pieces)
        if as_json:
            print_json(results)
        else:
            for r in results:
                print(" ".join(map(str, r.token_ids)))
                if args.pieces:
                    print(" ".join(r.pieces))
    return 0
