"""`stoke` command line: generate, serve (the HTTP server, server/launch.py) and bench
(a thin alias of benchmarks.offline)."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    try:
        llm = LLM(args.model, dtype=args.dtype)
    except (OSError, ValueError) as exc:  # a model it cannot load: said in a line, not a traceback
        print(f"stoke generate: cannot load {args.model or 'the embedded default'}: {exc}", file=sys.stderr)
        return 2
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop or None)
    if not args.raw and tokenizer is not None and tokenizer.chat_template:
        output = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0].outputs[0]
    else:
        output = llm.generate([args.prompt], params, use_tqdm=False)[0].outputs[0]
    print(output.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stoke", description="stoke: LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None,
                     help="HF checkpoint dir or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")

    sub.add_parser("bench", help="offline throughput benchmark (benchmarks/offline.py)", add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (stoke serve [MODEL] --host --port ...)",
                   add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        from server.launch import main as serve_main

        return serve_main(rest)
    if args.command == "bench":
        from benchmarks.offline import main as bench_main

        bench_main(rest)  # its report goes to the table and the JSON; the exit status is 0
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
