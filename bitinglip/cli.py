"""The ``bitinglip`` command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bitinglip.cli_checks import cli_words, missing_module
from bitinglip.errors import BitingLipError, ConfigError, InputError


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


#: the built-in inputs: ``sample:N`` sentences (embed, classify), ``sample-chat:N`` chats (generate)
SAMPLES = ("sample:", "sample-chat:")


def _is_sample(spec: str) -> bool:
    return spec.startswith(SAMPLES)


def _sample_input(spec: str, output_dir: str) -> str:
    """``sample:N`` writes N rows of the built-in corpus to Parquet,
    ``sample-chat:N`` N chats (a ``messages`` column)."""
    import pandas as pd

    from bitinglip.platform.jobs import sample_chats, sample_corpus

    kind, _, count = spec.partition(":")
    try:
        n = int(count)
    except ValueError:
        raise InputError(f"--input {spec!r}: expected {kind}:N with N a whole number") from None
    if n < 1:
        raise InputError(f"--input {spec!r}: N must be at least 1")
    path = os.path.join(output_dir, f"{kind}-{n}.parquet")
    os.makedirs(output_dir, exist_ok=True)
    frame = pd.DataFrame({"messages": sample_chats(n)}) if kind == "sample-chat" else pd.DataFrame(
        {"text": sample_corpus(n)})
    frame.to_parquet(path, index=False)
    return path


def cmd_run(args: argparse.Namespace) -> int:
    import bitinglip
    from bitinglip.cli_checks import check_gpu_here, check_model_here, check_text_column
    from bitinglip.platform.tasks import get_task, job_text_column
    from bitinglip.settings import get_settings

    # what can be checked without a cluster is checked before starting one (half a minute on 2 cores)
    task = get_task(args.task)
    task.check_options(dict(args.option))
    job_text_column(args.text_column)
    if not _is_sample(args.input):
        if not os.path.exists(args.input):
            raise InputError(f"--input {args.input!r} does not exist")
        check_text_column(Path(args.input), args.text_column, task.text_alternatives)
    if args.address is None:  # the embedded cluster's workers run here: so do these checks
        check_model_here(args.model, get_settings())
        if args.gpu:
            check_gpu_here()
    output = args.output or os.path.join("bitinglip-output", time.strftime("%Y%m%d-%H%M%S"))
    inputs: Any = args.input
    if _is_sample(args.input):
        inputs = _sample_input(args.input, os.path.join(output, "_input"))
    gpu = True if args.gpu else (False if args.cpu else None)
    print("starting workers and loading the model ...", file=sys.stderr, flush=True)
    loading = time.perf_counter()
    # preloading in the plugin's setup keeps model load time out of the job's throughput
    with bitinglip.connect(args.address, n_workers=args.workers, preload=[(args.task, args.model)]) as platform:
        # the embedded cluster serves the Jobs page (also in the dashboard's top bar, "Jobs")
        jobs_page = "" if args.address else f", jobs: {platform.dashboard_link.rsplit('/status', 1)[0]}/jobs"
        print(f"dashboard: {platform.dashboard_link}{jobs_page} (ready in {time.perf_counter() - loading:.1f}s)",
              file=sys.stderr, flush=True)
        started = time.perf_counter()
        job = platform.submit(args.task, model=args.model, inputs=inputs, output=output,
                              text_column=args.text_column, options=dict(args.option), gpu=gpu,
                              partition_rows=args.partition_rows, token_budget=args.token_budget, reuse=args.reuse,
                              priority=args.priority)
        print(f"job {job.id}: {job.total} rows in {len(job.futures)} partitions", file=sys.stderr, flush=True)
        job.progress(wait=not args.quiet)
        job.wait()
        seconds = time.perf_counter() - started
        summary = _summary(job, job.summaries(), seconds, output)
    if args.task == "generate":  # what a generation user compares: new tokens per second
        from bitinglip.platform.jobs import column_sum

        summary["new_tokens"] = column_sum(output, len(job.futures), "completion_tokens")
        summary["new_tokens_per_s"] = round(summary["new_tokens"] / seconds, 1) if seconds else None
        print(f"{summary['new_tokens']} new tokens ({summary['new_tokens_per_s']} tokens/s)", file=sys.stderr)
    print(f"{job.total} rows in {seconds:.1f}s ({summary['rows_per_s']} rows/s); output: {summary['output']}",
          file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _summary(job: Any, summaries: list[dict[str, Any]], seconds: float, output: str) -> dict[str, Any]:
    """The last line of ``run`` and ``resume``: one JSON object, the same keys for both."""
    return {"job": job.id, "task": job.spec.task.name, "model": job.spec.model, "rows": job.total,
            "partitions": len(summaries), "skipped_partitions": sum(1 for s in summaries if s.get("skipped")),
            "rows_in_error": sum(int(s.get("errors", 0)) for s in summaries),
            "rows_reused": sum(int(s.get("rows_reused") or 0) for s in summaries), "seconds": round(seconds, 3),
            "rows_per_s": round(job.total / seconds, 1) if seconds else None, "output": os.path.abspath(output)}


def cmd_resume(args: argparse.Namespace) -> int:
    import bitinglip
    from bitinglip.platform.jobs import RECORD, read_json, read_record

    record = read_json(os.path.join(os.path.abspath(args.output), RECORD))
    if record is None:  # before starting a cluster
        raise InputError(f"{os.path.abspath(args.output)} holds no job record ({RECORD}); nothing to resume")
    source = args.input or record.get("input")
    if source is None:
        raise InputError(f"the job in {os.path.abspath(args.output)} had in-memory inputs: pass them again "
                         "with --input")
    if not os.path.exists(source):
        raise InputError(f"the job's input {source!r} does not exist (any more); give it with --input")
    read_record(os.path.abspath(args.output))  # a bad field is named before a cluster starts
    if args.address is None:
        from bitinglip.cli_checks import check_model_here
        from bitinglip.settings import get_settings

        check_model_here(str(record.get("model")), get_settings())
    with bitinglip.connect(args.address, n_workers=args.workers) as platform:
        print(f"dashboard: {platform.dashboard_link}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        job = platform.resume(args.output, inputs=args.input)
        job.progress(wait=not args.quiet)
        summaries = job.summaries()
        seconds = time.perf_counter() - started
    summary = _summary(job, summaries, seconds, args.output)
    print(f"resumed job {job.id}: {summary['skipped_partitions']} of {len(summaries)} partitions were already "
          "committed", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Start Dask workers for BitingLip on this host: one per GPU with
    ``GPU=1``, else CPU workers; ``dask worker`` does the real work, and is
    started again when it exits (it does when it loses the scheduler)."""
    from bitinglip.platform.cluster import (
        check_address,
        cpu_count,
        dask_cli_arguments,
        gpu_count,
        settings_with_tls,
        supervise,
        worker_process_env,
    )
    from bitinglip.settings import get_settings

    settings = settings_with_tls(get_settings(), args)
    check_address(settings, args.scheduler)
    if not args.restart:  # nothing will wait for a scheduler that is not there
        from bitinglip.cli_checks import check_scheduler_reachable

        check_scheduler_reachable(args.scheduler)
    env = {**os.environ, **worker_process_env()}  # the nanny passes its environment on to the worker
    gpus = gpu_count() if args.gpus is None else args.gpus
    # `python -m dask` rather than `dask` from PATH: the same environment as this command
    base = [sys.executable, "-m", "dask", "worker", args.scheduler, "--nthreads", "1",
            *dask_cli_arguments(settings)]
    if args.name:
        base += ["--name", args.name]
    commands: list[tuple[list[str], dict[str, str]]] = []
    per = args.gpus_per_worker
    if gpus and gpus % per:
        raise InputError(f"--gpus-per-worker {per} does not divide the {gpus} GPUs of this host")
    if gpus:
        threads = max(1, cpu_count() * per // gpus)
        # several GPUs per worker: vLLM splits a model over them (tensor parallelism) with one process per
        # GPU, which a nanny's daemonic worker may not start: such a worker runs without a nanny
        nanny = ["--no-nanny"] if per > 1 else []
        for i in range(gpus // per):
            cmd = base + ["--nworkers", "1", "--resources", f"GPU={per}", *nanny]
            devices = ",".join(str(d) for d in range(i * per, (i + 1) * per))
            commands.append((cmd, {**env, "CUDA_VISIBLE_DEVICES": devices, "OMP_NUM_THREADS": str(threads),
                                   "BITINGLIP_GPUS_PER_WORKER": str(per)}))
    else:
        n = args.nworkers or cpu_count()
        commands.append((base + ["--nworkers", str(n)],
                         {**env, "OMP_NUM_THREADS": str(max(1, cpu_count() // n))}))
    for cmd, cmd_env in commands:
        device = f" (CUDA_VISIBLE_DEVICES={cmd_env['CUDA_VISIBLE_DEVICES']})" if gpus else ""
        print("+", shlex.join(cmd) + device, file=sys.stderr, flush=True)
    return supervise(commands, restart=args.restart)


def options_help() -> str:
    """Each built-in task's options, with type, range and default (the tasks' contract)."""
    from bitinglip.platform.tasks import TASK_OPTIONS, option_rows

    lines = ["task options (--option KEY=VALUE; [low, high]: from low to high, (low, high]: above low):"]
    for task in TASK_OPTIONS:
        rows = option_rows(task)
        width = max(len(name) for name, *_ in rows)
        lines.append(f"  {task}:")
        lines += [f"    {name:<{width}}  {kind}{f', {span}' if span else ''}, default {default}"
                  for name, kind, span, default, _ in rows]
    return "\n".join(lines)


def setting_help(field: str) -> str:
    """An option's help from the setting it overrides: the field's description, its variable and default,
    so the two cannot name different things."""
    from bitinglip.settings import Settings, env_name

    info = Settings.model_fields[field]
    return f"{info.description} (default: ${env_name(field)}, unset: {info.default})"


def _priority(text: str) -> int:
    from bitinglip.platform.tasks import job_priority

    try:
        return job_priority(int(text) if text.lstrip("-").isdigit() else text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def job_field_help(field: str) -> str:
    """An option's help from the REST API's job field of the same name (its description, bounds, default)."""
    from bitinglip.platform.tasks import JobFields, bound

    info, span = JobFields.model_fields[field], bound(JobFields, field)
    return f"{info.description}, {span.low} to {span.high} (default: {info.default})"


def cmd_config(args: argparse.Namespace) -> int:
    from bitinglip.settings import describe, markdown_table

    if args.markdown:
        print(markdown_table(), end="")
        return 0

    rows = [("SETTING", "VARIABLE", "SOURCE", "VALUE"), *describe()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)), row[3])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitinglip", description="Batch inference on Dask.")
    sub = parser.add_subparsers(dest="command", required=True, help="what to do; COMMAND -h for its options")

    run = sub.add_parser("run", help="run a job and write its results to Parquet", epilog=options_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--task", required=True, help="embed, classify, generate")
    run.add_argument("--model", required=True, help="a model name or a save_pretrained directory")
    run.add_argument("--input", required=True,
                     help="a Parquet/JSONL/CSV path, sample:N for N rows of the built-in corpus, or sample-chat:N "
                          "for N built-in chats (a messages column, for --task generate)")
    run.add_argument("--output", help="output directory (default: bitinglip-output/<time>)")
    run.add_argument("--address", help="Dask scheduler address (default: an embedded local cluster)")
    run.add_argument("--workers", type=_positive, help="workers of the embedded cluster")
    run.add_argument("--text-column", default="text", help="the input's column of texts (default: %(default)s)")
    run.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                     help="a task option (listed below); VALUE is read as JSON when it parses (true, 3, [\"a\"])")
    run.add_argument("--partition-rows", type=_positive, metavar="ROWS", help=setting_help("partition_rows"))
    run.add_argument("--token-budget", type=_positive, metavar="TOKENS", help=setting_help("token_budget"))
    run.add_argument("--priority", type=_priority, metavar="N", help=job_field_help("priority"))
    where = run.add_mutually_exclusive_group()
    where.add_argument("--gpu", action="store_true", help="require GPU workers")
    where.add_argument("--cpu", action="store_true", help="do not require GPU workers")
    run.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=None,
                     help="take rows an earlier job computed from the workers' result store (default: for "
                          "deterministic settings: embed, classify, greedy or seeded generation)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="finish a failed, cancelled or interrupted job from its output directory")
    resume.add_argument("output", help="the job's output directory (it holds _job.json)")
    resume.add_argument("--input", help="the input again, when the job recorded none (in-memory inputs)")
    resume.add_argument("--address", help="Dask scheduler address (default: an embedded local cluster)")
    resume.add_argument("--workers", type=_positive, help="workers of the embedded cluster")
    resume.add_argument("--quiet", action="store_true", help="no progress bar")
    resume.set_defaults(func=cmd_resume)

    worker = sub.add_parser("worker", help="start Dask workers for a scheduler (wraps `dask worker`)")
    worker.add_argument("scheduler", help="scheduler address, e.g. tcp://10.0.0.1:8786")
    worker.add_argument("--gpus", type=int, help="GPU workers to start (default: every visible GPU)")
    worker.add_argument("--nworkers", type=_positive, help="CPU workers (default: one per core)")
    worker.add_argument("--gpus-per-worker", type=_positive, default=1,
                        help="GPUs per worker (resource GPU=N): generation on vLLM splits a model over them "
                             "(default: %(default)s)")
    worker.add_argument("--name", help="the worker's name on the dashboard (default: Dask's)")
    worker.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                        help="start dask worker again when it exits, e.g. after losing the scheduler "
                             "(default: on)")
    from bitinglip.platform.cluster import add_tls_arguments

    add_tls_arguments(worker)
    worker.set_defaults(func=cmd_worker)

    config = sub.add_parser("config", help="print the effective settings and where each comes from "
                                           "(default or its environment variable); secrets masked")
    config.add_argument("--markdown", action="store_true",
                        help="print the table of variables, defaults and meanings (the README's) instead")
    config.set_defaults(func=cmd_config)

    from bitinglip.gateway.serve import register as register_gateway

    register_gateway(sub)
    from bitinglip.platform.models import register_model_commands
    register_model_commands(sub)
    from bitinglip.platform.cluster import register_stack_commands
    register_stack_commands(sub, load_mint=_gateway_mint)
    return parser


def _gateway_mint() -> Callable[..., str]:
    """The gateway's token minter, for ``bitinglip up``: the platform does not import the gateway,
    and the gateway extra may be absent (then this raises ModuleNotFoundError, which ``main`` explains)."""
    from bitinglip.gateway.auth import mint

    return mint


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from bitinglip.settings import get_settings

        get_settings()
        return int(args.func(args))
    except ConfigError as exc:
        print(f"bitinglip: configuration error: {cli_words(str(exc))}", file=sys.stderr)
        return 2
    except BitingLipError as exc:
        print(f"bitinglip: {cli_words(str(exc))}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        print(missing_module(args.command, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left early (`bitinglip models show NAME | head`): not an error of ours
        # Python flushes stdout once more at exit; pointed at /dev/null that flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
