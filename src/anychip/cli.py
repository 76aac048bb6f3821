"""The `anychip` command: parses arguments and calls the library. User errors → one line, exit 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable

from anychip.errors import DEBUG_ENV, UserError
from anychip.files import Terminated

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """Bad arguments are one line, exit 2, like every other user error (argparse adds a usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"anychip: error: {message} (see {self.prog} --help)\n")


def count(minimum: int, maximum: int = 2**31 - 1) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer in [{minimum}, {maximum}], got {text!r}")
        return value

    return parse


def number(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a finite number in {bounds}, got {text!r}")
        return value

    return parse


def load_config_args(args: argparse.Namespace):
    """`[CONFIG.yaml] [key=value ...]`: argparse gives a leading override to `config`; move it back."""
    from anychip.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    return load_config(config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        from anychip.config import describe

        print("\n".join(describe()).strip("\n"))
        return 0
    from anychip.model.generate import generate_text
    from anychip.train.loop import train
    from anychip.train.preemption import Preempted

    t0 = time.perf_counter()
    cfg = load_config_args(args)
    try:
        result = train(cfg)
    except Preempted as e:  # SIGTERM/SIGINT: 75 = checkpoint written, rerun to resume (docs/resume.md)
        print(f"anychip: {e}", file=sys.stderr)
        return e.exit_code
    import jax  # after train(): jax.distributed must start before anything asks for devices

    if jax.process_index() != 0:  # process 0 speaks for the run
        return 0
    final, start = result.final_eval, result.initial_eval.loss if result.initial_eval else float("nan")
    print(f"done in {time.perf_counter() - t0:.0f}s: {result.steps} steps, held-out loss {start:.3f} -> "
          f"{final.loss:.3f} (perplexity {final.perplexity:.1f}, {final.bits_per_byte:.3f} bits/byte); "
          f"run saved in {result.run_dir}")
    ledger = result.ledger
    price = "price unknown (set log.price_per_hour)" if ledger["cost_usd"] is None else (
        f"${ledger['cost_usd']:.4f} at ${ledger['price_per_hour']:.2f}/chip-hour, "
        f"${ledger['usd_per_mtok']:.4f} per million tokens")
    print(f"cost: {ledger['chip_hours']:.4f} chip-hours of {ledger['chip']}, {price}")
    if cfg.eval.sample_tokens and jax.process_count() > 1:
        print("(no sample: params span several processes; run `anychip generate RUN_DIR` on one host)")
    elif cfg.eval.sample_tokens:
        from anychip.data.tokenizer import load_tokenizer
        from anychip.train.run_dir import RunDir

        run = RunDir(result.run_dir)
        tokenizer = run.prompt_tokenizer(load_tokenizer(run.tokenizer))
        text = generate_text(result.params, cfg.model, tokenizer, args.sample_prompt,
                             max_new_tokens=cfg.eval.sample_tokens, temperature=0.7, top_k=40, seed=0)
        print(f"--- sample (temperature 0.7, top-k 40) ---\n{args.sample_prompt}{text}\n---")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from anychip.data.prepare import prepare

    manifest = prepare(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                       val_fraction=args.val_fraction, text_field=args.text_field,
                       parquet_column=args.parquet_column, engine=args.engine, ray_address=args.ray_address)
    splits = manifest["splits"]
    print(f"wrote {args.out}: " + ", ".join(
        f"{name} {s['tokens']:,} tokens / {s['documents']:,} documents" for name, s in splits.items()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from anychip.train.evaluate import evaluate_run

    if args.tasks:
        require_extra("lm_eval", "eval")
        from anychip.interop.harness import run_tasks

        print(run_tasks(args.run_dir, args.tasks, batch_size=args.batch_size or 8, limit=args.limit,
                        dtype=args.dtype, num_fewshot=args.num_fewshot, output=args.output))
        return 0
    result = evaluate_run(args.run_dir, args.data, args.batches, seq_len=args.seq_len, stride=args.stride,
                          dtype=args.dtype, batch_size=args.batch_size)
    print(f"held-out loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | "
          f"bits per byte {result.bits_per_byte:.4f} | {result.tokens:,} tokens")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from anychip.model.generate import generate_text
    from anychip.train.run_dir import RunDir, load_run

    cfg, params, tokenizer = load_run(args.run_dir)
    text = generate_text(params, cfg.model, RunDir(args.run_dir).prompt_tokenizer(tokenizer), args.prompt,
                         chat=args.chat, stop=args.stop, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(text if args.chat else args.prompt + text)
    return 0


def require_extra(module: str, extra: str) -> None:
    """A one-line error, not an ImportError traceback, when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"this needs the '{extra}' extra: pip install -e '.[{extra}]'")


def cmd_serve(args: argparse.Namespace) -> int:
    require_extra("uvicorn", "serve")
    require_extra("starlette", "serve")
    from anychip.interop.serve import serve

    serve(args.run_dir, args.host, args.port, slots=args.slots, max_queue=args.max_queue,
          max_seq_len=args.max_seq_len, dtype=args.dtype, model_name=args.model_name)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from anychip.train.report import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from anychip.check.bench import format_profile, format_record, run_bench, write_record

    record = run_bench(load_config_args(args), steps=args.steps, warmup=args.warmup, profile_dir=args.profile)
    print(format_record(record))
    if record.profile:
        print(format_profile(record.profile))
    if args.json:
        write_record(record, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from anychip.interop.hf import export_hf

    print(f"wrote a Hugging Face checkpoint to {export_hf(args.run_dir, args.out)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from anychip import storage
    from anychip.interop.hf import CONTINUED_PRETRAINING as o
    from anychip.interop.hf import import_hf

    run_dir = import_hf(args.hf_dir, args.out, extend_with=args.extend_with, extra_tokens=args.extra_tokens)
    how = (f"anychip train {run_dir}/config.yaml init_from={run_dir} run_dir=NEW_RUN data.path=DATA"
           if not storage.is_remote(run_dir) else
           f"anychip train config.yaml run_dir={run_dir} data.path=DATA (config.yaml: a copy of {run_dir}/config.yaml; "
           "the run resumes from its checkpoint 0)")
    print(f"imported {args.hf_dir} into {run_dir}; continue pretraining with: {how}\n"
          f"its optimizer is set for continued pretraining: peak lr {o.lr:g} after {o.warmup_steps} warmup steps, "
          f"cosine to {o.lr * o.min_lr_ratio:g} (a from-scratch rate would overwrite what the model knows; "
          "docs/serving.md). Change it with optim.lr=... optim.warmup_steps=...")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Lower and serialize the train step for each platform; exit 1 if any check fails. With --compile,
    compile it for each --target chip instead; exit 1 if it does not fit."""
    if args.compile:
        return cmd_check_compile(args)
    from anychip.check.portability import check, format_report

    cfg = load_config_args(args)
    platforms = list(dict.fromkeys([p.strip() for p in args.platforms.split(",") if p.strip()] + args.target))
    reports = check(cfg, platforms, args.devices, args.strict)
    for report in reports:
        print("\n".join(format_report(report, cfg, args.devices)))
    failed = [r.platform for r in reports if not r.ok]
    print(f"check: {'FAILED on ' + ', '.join(failed) if failed else 'ok on ' + ', '.join(platforms)}")
    return 1 if failed else 0


def cmd_check_compile(args: argparse.Namespace) -> int:
    from anychip.check.compile import compile_step, format_compile_report, parse_target
    from anychip.files import write_text_atomic

    if not args.target:
        raise UserError("--compile needs at least one --target, e.g. --target tpu-v5p:8 or --target h100:8")
    targets = [parse_target(t) for t in args.target]
    cfg = load_config_args(args)
    reports = [compile_step(cfg, t) for t in targets]
    for report in reports:
        print("\n".join(format_compile_report(report)))
    if args.json:
        out = [r.as_json() for r in reports]
        write_text_atomic(args.json, json.dumps(out[0] if len(out) == 1 else out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r.fits is False for r in reports) else 0


def cmd_hardware(args: argparse.Namespace) -> int:
    from anychip.cost.hardware import format_catalog_table, load_catalog

    print(format_catalog_table(load_catalog(args.prices or [])))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from anychip.cost import calibration, planner

    chips = args.chips.split(",") if args.chips else None
    common = {"batch_size": args.batch_size, "prices": args.prices or [], "calibration": args.calibration or []}
    rows = planner.plan(args.model, args.tokens, args.seq_len, chips, num_chips=args.num_chips,
                        deadline=args.deadline, budget=args.budget, remats=args.remat.split(","), **common)
    print(planner.format_plan_table(rows))
    if args.verify:
        from anychip.check.compile import verify_plan_row

        batch = args.batch_size or planner.make_job(args.model, args.tokens, args.seq_len).batch
        print("\nverified by the target's compiler (per device):")
        for row in (r for r in rows if r.layout):
            print(verify_plan_row(args.model, row, args.seq_len, batch), flush=True)
    if args.calibration:
        records = calibration.load_records(args.calibration)
        print("\ncalibration (step time predicted vs measured):")
        print(calibration.format_calibration_table(calibration.calibration_report(records)))
    if args.plot:
        rows = planner.sweep(args.model, args.tokens, args.seq_len, chips, **common)
        print(f"wrote {planner.pareto_plot(rows, args.plot, f'{args.model}, {args.tokens} tokens')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="anychip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (or resume) a model; no arguments = the built-in demo run")
    p.add_argument("config", nargs="?", help="a YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=350m train.steps=2000")
    p.add_argument("--sample-prompt", default="def ", help="prompt of the sample printed at the end")
    p.add_argument("--help-config", action="store_true", help="list every setting with its default and meaning")
    p.set_defaults(handler=cmd_train)

    data = sub.add_parser("data", help="prepare corpora").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize files/folders/globs into token shards")
    p.add_argument("inputs", nargs="+", help="files, folders, globs or s3:// gs:// URLs (.txt .jsonl .parquet "
                   ".arrow, HF save_to_disk folders; .gz .zst)")
    p.add_argument("--out", required=True, help="output directory or URL (must not exist or be empty)")
    p.add_argument("--vocab-size", type=count(257), default=8192, help="vocabulary of the BPE tokenizer to train")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    p.add_argument("--val-fraction", type=number(0, 0.999), default=0.01, help="share of documents held out")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    p.add_argument("--parquet-column", default="text", help="column holding the text in .parquet/.arrow files")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="run the tasks here, or on Ray (a re-run resumes: finished tasks are skipped)")
    p.add_argument("--ray-address", help="a Ray cluster to join (default: start one on this machine)")
    p.set_defaults(handler=cmd_data_prepare)

    p = sub.add_parser("eval", help="held-out loss, perplexity and bits per byte of a run")
    p.add_argument("run_dir")
    p.add_argument("--data", help="a prepared data dir (default: the run's own data)")
    p.add_argument("--batches", type=count(1), help="evaluate at most this many batches (default: every token)")
    p.add_argument("--seq-len", type=count(1), help="tokens per window (default: the run's train.seq_len, at most "
                   "model.max_seq_len)")
    p.add_argument("--stride", type=count(1), help="a window starts every STRIDE tokens and scores only the tokens "
                   "the previous one did not, after seq_len - stride tokens of context (default: seq_len)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--batch-size", type=count(1), help="windows per batch (default: the run's train.batch_size; "
                   "8 for --tasks)")
    p.add_argument("--tasks", nargs="+", metavar="NAME_OR_YAML", help="run lm-evaluation-harness tasks instead: "
                   "names, or task YAML files (pip install -e '.[eval]')")
    p.add_argument("--limit", type=float, help="--tasks: at most this many examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=count(0), help="--tasks: few-shot examples per prompt")
    p.add_argument("--output", help="--tasks: also write lm-eval's results (and per-sample logs) to this JSON")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue (special-token text such as <|im_end|> "
                   "is the token)")
    p.add_argument("--chat", action="store_true", help="the prompt is a user message: apply the chat template "
                   "and print the reply")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut the output before TEXT (repeatable); generation always ends at the model's "
                   "end-of-sequence tokens")
    p.add_argument("--max-new-tokens", type=count(1), default=100)
    p.add_argument("--temperature", type=number(0, 100), default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=count(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0, help="1 = off")
    p.add_argument("--seed", type=count(0, 2**32 - 1), default=0)
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run (pip install -e '.[serve]')")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only: there is no "
                   "authentication)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (the batch of each step)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before a 429")
    p.add_argument("--max-seq-len", type=int, help="tokens per sequence, prompt included (default: the model's "
                   "max_seq_len); the KV cache holds slots x this")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute and KV-cache dtype")
    p.add_argument("--model-name", help="the model id clients ask for (default: the run dir's name)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("report", help="plot loss and throughput curves of a run to a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("bench", help="steady-state step time, tokens/s, MFU and memory of a config")
    p.add_argument("config", nargs="?", help="a YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=1b train.batch_size=8")
    p.add_argument("--steps", type=count(1), default=10, help="timed steps")
    p.add_argument("--warmup", type=count(0), default=3, help="untimed steps before timing")
    p.add_argument("--json", help="also write the record to this JSON file")
    p.add_argument("--profile", metavar="DIR", help="also trace 3 steps into DIR (Perfetto, TensorBoard) and "
                   "print where the device time goes")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("hardware", help="the accelerator catalog (specs, prices, sources)")
    p.add_argument("--prices", nargs="+", help="YAML files overriding prices or adding chips")
    p.set_defaults(handler=cmd_hardware)

    p = sub.add_parser("plan", help="predict time, memory and cost of a pretraining job on each chip")
    p.add_argument("--model", required=True, help="a model preset (e.g. afm-3b) or a config YAML")
    p.add_argument("--tokens", required=True, help="training tokens, e.g. 6.3T, 300B, 2e9")
    p.add_argument("--seq-len", "--seq", type=count(1), default=4096)
    p.add_argument("--batch-size", type=count(1), help="global batch in sequences (default: ~4M tokens)")
    p.add_argument("--chips", help="comma-separated catalog keys (default: all training chips)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-chips", type=count(1), help="plan for this many chips")
    size.add_argument("--deadline", help="fewest chips that finish within e.g. 30d, 12h")
    p.add_argument("--budget", type=number(0, low_open=True), help="drop plans costing more than this many USD")
    p.add_argument("--prices", nargs="+", help="YAML files overriding prices or adding chips")
    p.add_argument("--calibration", nargs="+", help="`anychip bench --json` records to fit efficiencies")
    p.add_argument("--remat", default="none,dots,full", help="remat policies to consider")
    p.add_argument("--plot", help="write a cost-vs-time Pareto plot (PNG) here")
    p.add_argument("--verify", action="store_true", help="compile each row's layout with its chip's compiler "
                   "(needs the aot extra; TPU and NVIDIA rows) and show its memory against HBM")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face model")
    p.add_argument("run_dir", help="a run directory or URL (s3://, gs://)")
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("out", help="output directory or URL (must not exist or be empty)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("import", help="import a model from another format")
    fmt = p.add_subparsers(dest="import_format", required=True)
    p = fmt.add_parser("hf", help="a Hugging Face Llama/Qwen3/Mistral checkpoint directory (safetensors only)")
    p.add_argument("hf_dir", help="the model directory, local or a URL (s3://, gs://)")
    p.add_argument("--out", required=True, help="the run directory (or URL) to create")
    p.add_argument("--extend-with", nargs="+", help="corpus files/folders to learn extra tokens from")
    p.add_argument("--extra-tokens", type=count(0), default=0, help="how many tokens to add (with --extend-with)")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("check", help="will the train step compile on other hardware? lowers and serializes "
                                     "it per platform, flags vendor-specific or unsupported operations")
    p.add_argument("config", nargs="?", help="a YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=1b mesh.tensor=2")
    p.add_argument("--platforms", default="cpu,cuda,tpu,neuron", help="of cpu,cuda,rocm,tpu,neuron")
    p.add_argument("--target", action="append", default=[], help="one more platform, e.g. --target neuron; with "
                   "--compile a chip and count to compile for: tpu-v4|tpu-v5e|tpu-v5p|tpu-v6e|tpu-7x|h100|h200|cpu:N")
    p.add_argument("--compile", action="store_true", help="compile the train step with each --target's own "
                   "compiler (needs the aot extra) and report memory per device against its HBM")
    p.add_argument("--json", help="--compile: also write the report(s) to this JSON file")
    p.add_argument("--devices", type=count(1, 65536), default=8, help="devices of the (abstract) mesh to lower for")
    p.add_argument("--strict", action="store_true", help="fail on vendor custom calls even on their platform")
    p.set_defaults(handler=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (bad input, a busy run dir, a full or read-only disk) is one line on
    stderr and exit 2; SIGTERM/Ctrl-C outside training one line and 128 + signal (an unfinished output is
    removed); anything else is a bug and keeps its traceback. ANYCHIP_DEBUG=1 shows every traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UserError, Terminated, KeyboardInterrupt) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        if isinstance(e, UserError):
            print(f"anychip: error: {e}", file=sys.stderr)
            return 2
        print(f"anychip: stopped by {'SIGTERM' if isinstance(e, Terminated) else 'SIGINT'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
