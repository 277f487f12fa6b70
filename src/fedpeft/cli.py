"""The ``fedpeft`` command line: a thin layer over :mod:`fedpeft.experiment`.

User mistakes (bad config, missing files, unknown names) end in one ``error: ...`` line and exit
code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedpeft.errors import FedPeftError
from fedpeft.hub import single_library_logs

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated parameter-efficient fine-tuning of pre-trained transformers.")
LOG_WIDTH = 10_000  # wider than any line fedpeft prints: in a log, one output line is one line


def make_console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr) that reads well wherever the output goes.

    Parameters
    ----------
    stderr : bool
        Write to stderr instead of stdout.

    Returns
    -------
    Console
        On a terminal, one as wide as the terminal. When the stream is a file or a pipe
        (``fedpeft run ... > log 2>&1``), one that never wraps: rich's default there is 80
        columns, which breaks long lines and table cells (URLs) mid-word.
    """
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else LOG_WIDTH)


console = make_console(stderr=True)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]

SecretOption = Annotated[
    Optional[Path],
    typer.Option(help="The shared secret the SuperLink / SuperNode was given with the same option."),
]


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Experiment config (TOML).")] = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: output.dir).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the killed or finished run in this folder.")] = None,
) -> None:
    """Run a federated fine-tuning experiment and write its results to a run folder."""
    from fedpeft.config import Config, apply_overrides, load_config
    from fedpeft.results import RunDir, load_run_config

    if config is None and resume is None:
        raise FedPeftError("give a CONFIG file, or --resume DIR to continue a run")
    stop_on_sigterm()
    if config is not None:
        cfg = load_config(config, set_ or [])
    else:  # the run's own config (config.toml, or the checkpoint's copy if that is damaged)
        saved, restored = load_run_config(RunDir(resume))
        if restored:
            console.print(f"[yellow]warning:[/] {restored}", soft_wrap=True, highlight=False)
        cfg = Config.from_dict(apply_overrides(saved.to_dict(), set_ or []))
    out_dir = resume if resume is not None else out
    from fedpeft.runner import run_experiment  # no torch for a Flower deployment: the ServerApp runs there

    summary = run_experiment(cfg, out_dir, resume is not None, console)
    run_dir = out_dir or cfg.output_dir()
    _print_summary(summary, run_dir)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Base experiment config (TOML).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder: one sub-folder per run.")],
    grid: Annotated[Optional[list[str]], typer.Option(
        "--grid", "-g", help="section.key=v1,v2 (repeatable; cartesian product). Tie keys: a.b+c.d=1+10,10+1.")] = None,
    set_: SetOption = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds, one run per seed and grid point.")] = "0",
) -> None:
    """Run a grid of experiments; re-running skips finished runs and resumes killed ones."""
    from fedpeft.sweep import run_sweep

    seed_list = _seeds(seeds)
    logging.getLogger("fedpeft").setLevel(logging.INFO)
    stop_on_sigterm()
    outcomes = run_sweep(config, out, grid or [], set_ or [], seed_list)
    _print_outcomes(outcomes, out)
    failed = [n for n, o in outcomes.items() if o.startswith("failed")]
    if failed:
        raise FedPeftError(f"{len(failed)} of {len(outcomes)} runs failed: {', '.join(failed)}; run the same command again to retry them")


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="Experiment config (TOML) to choose learning rates for.")],
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: the config's method.name).")] = None,
    grid: Annotated[Optional[list[str]], typer.Option(
        "--grid", "-g", help="Replace or add a candidate axis: section.key=v1,v2 (repeatable), e.g. federation.lr=1e-3,1e-2.")] = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Tune folder (default: tune-<config stem>).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Proxy rounds (at most the config's federation.rounds; candidates tied at the top run longer, up to it).")] = 2,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds: one proxy run per seed and candidate.")] = "0",
    validation_fraction: Annotated[float, typer.Option(help="Share of the rows a run trains on held out to score on (from the train split).")] = 0.2,
    halving: Annotated[bool, typer.Option(help="Successive halving: the better half goes on after 1, 2, 4, ... rounds.")] = False,
) -> None:
    """Choose each method's federation.lr (and server_lr) on short proxy runs scored on validation
    rows of the train split, and print the commands to run with them."""
    from fedpeft.tune import grid_table, run_tune, tie_notes

    logging.getLogger("fedpeft").setLevel(logging.INFO)
    stop_on_sigterm()
    out = out or Path(f"tune-{config.stem}")
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    tuning = run_tune(config, out, method_list, grid or [], set_ or [], _seeds(seeds), rounds, validation_fraction, halving)
    typer.echo(grid_table(tuning))
    if tuning.ties:
        typer.echo("Ties at the top:\n" + "\n".join(f"- {note}" for note in tie_notes(tuning)) + "\n")
    typer.echo("\n".join(tuning.commands()))
    console.print(f"wrote {out / 'tune.json'}, tune.md and tune.png", markup=False, soft_wrap=True)
    unchosen = sorted({c.method for c in tuning.candidates} - set(tuning.choices))
    if unchosen:
        raise FedPeftError(f"every candidate of {', '.join(unchosen)} failed (see {out / 'tune.md'}); run the same command again to retry them")


def _seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as ints."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FedPeftError(f"--seeds {text!r}: expected comma-separated integers such as 0,1,2") from None


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Experiment config (TOML); [budgets] gives the device profiles.")],
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: the config's method.name).")] = None,
    models: Annotated[Optional[str], typer.Option(
        help="Comma-separated candidate model.name values; also reports the mean blocks `layers` trains on each.")] = None,
    set_: SetOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Predict each method's memory, FLOPs and bytes per round for every device profile, and
    whether it fits, before anything trains (the cost model; no training)."""
    from fedpeft.budgets.planner import plan as make_plan
    from fedpeft.config import load_config

    cfg = load_config(config, set_ or [])
    planning = make_plan(cfg, _names(methods), _names(models))
    if json_:
        typer.echo(json.dumps(planning.as_json(bool(models)), indent=2))
        return
    _print_plan(planning, config, bool(cfg.budgets.profiles), bool(models))


def _names(text: Optional[str]) -> list[str] | None:
    """``a,b`` as a list (None when not given)."""
    return [n.strip() for n in text.split(",") if n.strip()] or None if text else None


def _print_plan(planning, config: Path, budgets: bool, with_models: bool) -> None:
    """``fedpeft plan``'s tables: one row per model x method x profile, then the model choice."""
    table = Table()
    several = len({r.model for r in planning.rows}) > 1
    for col in (["model"] if several else []) + ["method", "profile", "clients", "rows", "k", "trainable",
                                                  "peak MiB", "FLOPs/round", "MB up", "MB down", "fits"]:
        table.add_column(col, justify="left" if col in ("model", "method", "profile", "fits") else "right")
    for r in planning.rows:
        fits = "yes" if r.fits else f"no: {', '.join(r.exceeds)}"
        cells = ([r.model] if several else []) + [
            r.method, r.profile, str(r.clients), str(r.samples), "-" if r.k is None else str(r.k),
            f"{r.trainable_params:,}", f"{r.memory_mb:.2f}", f"{r.flops_per_round:.3g}", f"{r.upload_mb:.3f}",
            f"{r.download_mb:.3f}", fits]
        table.add_row(*map(Text, cells))
    _print_titled(f"fedpeft plan: {config}", table)
    out = make_console()
    say = lambda text: out.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say("FLOPs per round are for a client of `rows` training rows: the mean client of that profile "
        "(the mean client of the whole partition when no client has it); peak memory in MiB, bytes in MB (1e6).")
    if budgets:
        fitting = planning.fitting_methods()
        say(f"fits every profile: {', '.join(fitting)}" if fitting else
            "no method fits the budgets of every profile (see the fits column)")
    if with_models:
        choice = Table("model", "blocks", "mean k (layers)", "infeasible clients")
        for m in planning.models:
            choice.add_row(Text(m.model), str(m.num_blocks), f"{m.mean_k:.2f}", str(m.infeasible))
        out.print(choice)
        say(f"best backbone for layers under these budgets: {planning.best_model} "
            "(the most blocks trained per client on average)")


@app.command()
def report(runs_dir: Annotated[Path, typer.Argument(help="A folder holding run folders (e.g. a sweep's --out).")]) -> None:
    """Write DIR/report.md (accuracy, or causal-LM loss / perplexity / exact match / ROUGE-L, and
    costs per run group) and PNG plots, and print the table."""
    from fedpeft.report import markdown_table, write_report

    written = write_report(runs_dir)
    typer.echo(markdown_table(written.rows, written.columns))  # plain markdown: readable at any width, pasteable
    if written.notes:
        typer.echo("\n".join(written.notes))
    console.print(f"wrote {written.path} and {', '.join(written.plots)}", markup=False, soft_wrap=True)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `fedpeft run`.")],
    set_: SetOption = None,
) -> None:
    """Re-evaluate the saved global state of a run on its test split.

    --set may point at moved data (e.g. data.data_dir=NEW); the data fingerprint must still match.
    """
    from fedpeft.experiment import evaluate_run

    metrics = evaluate_run(run_dir, set_ or [])
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def methods() -> None:
    """List the registered fine-tuning methods and their options."""
    import dataclasses

    from fedpeft.methods import get_method_class, method_names

    table = Table("method")
    table.add_column("options (method.<key> = default)", overflow="fold")
    table.add_column("paper", no_wrap=True)  # a link stays whole: the options wrap instead
    for name in method_names():
        cls = get_method_class(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        table.add_row(name, Text(opts or "-"), cls.paper)
    make_console().print(table)


@app.command()
def datasets() -> None:
    """List the known dataset names (data.name) and where each is looked for."""
    from fedpeft.data import KNOWN_DATASETS

    table = Table("name", "local folder (under data.data_dir)")
    table.add_column("hub fallback", no_wrap=True)  # a hub id stays whole
    for name, spec in KNOWN_DATASETS.items():
        table.add_row(name, getattr(spec, "folder", name), getattr(spec, "hub_id", "") or "-")
    make_console().print(table)


def _start_service(insecure: bool, root_certificates: Optional[Path]) -> None:
    """What every long-lived worker checks and sets up first: TLS or --insecure, a timestamped log."""
    if not insecure and root_certificates is None:
        raise FedPeftError("give --root-certificates for a TLS Runtime API, or --insecure on loopback")
    logging.basicConfig(force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # a service log
    logging.getLogger("fedpeft").setLevel(os.environ.get("FEDPEFT_LOG", "INFO"))


def _str(path: Optional[Path]) -> str | None:
    return str(path) if path else None


@app.command("flower-worker")
def flower_worker(
    runtime_api_address: Annotated[str, typer.Option(help="The SuperNode's Runtime API (its --host:--port).")] = "127.0.0.1:9094",
    insecure: Annotated[bool, typer.Option(help="Plain HTTP to the SuperNode (loopback only).")] = False,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate of the SuperNode's Runtime API TLS.")] = None,
    ready_file: Annotated[Optional[Path], typer.Option(help="Touch this file once ready to serve.")] = None,
    parent_pid: Annotated[Optional[int], typer.Option(help="Exit when this process (the SuperNode) is gone.")] = None,
    superexec_auth_secret_file: SecretOption = None,
) -> None:
    """Serve a SuperNode's ClientApp tasks from one long-lived process (flower-supernode --isolation process).

    The model is loaded on the first round and kept for the rest of the run.
    `fedpeft flower-supernode` starts one for you.
    """
    from fedpeft.runtime.flower.worker import serve

    _start_service(insecure, root_certificates)
    if parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(parent_pid)
    serve(runtime_api_address, insecure, _str(root_certificates), ready_file=_str(ready_file),
          auth_secret_file=_str(superexec_auth_secret_file))


@app.command("flower-server-worker")
def flower_server_worker(
    runtime_api_address: Annotated[str, typer.Option(help="The SuperLink's Runtime API (its --host:--port).")] = "127.0.0.1:9093",
    insecure: Annotated[bool, typer.Option(help="Plain HTTP to the SuperLink (loopback only).")] = False,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate of the SuperLink's TLS.")] = None,
    ready_file: Annotated[Optional[Path], typer.Option(help="Touch this file once ready to serve.")] = None,
    superexec_auth_secret_file: SecretOption = None,
) -> None:
    """Run every ServerApp of a SuperLink (flower-superlink --isolation process) in one long-lived process.

    torch and the model code are imported once, not at the start of every run.
    """
    from fedpeft.runtime.flower.server_worker import serve_server_apps

    _start_service(insecure, root_certificates)
    serve_server_apps(runtime_api_address, insecure, _str(root_certificates), _str(ready_file),
                      _str(superexec_auth_secret_file))


@app.command("flower-keys")
def flower_keys(
    directory: Annotated[Path, typer.Argument(help="Folder to write the credentials into.")],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make (nodes/node-0 ... node-<N-1>).")] = 2,
    host: Annotated[Optional[list[str]], typer.Option(help="A name or IP address of the SuperLink for its certificate, besides localhost/127.0.0.1 (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Replace credentials already in the folder.")] = False,
) -> None:
    """Make development credentials for a secure Flower deployment, as Flower's examples do.

    A CA (ca.crt), the SuperLink's TLS certificate and key (server.pem, server.key), one EC key
    pair per SuperNode (nodes/node-<i>, nodes/node-<i>.pub: register the .pub with `flwr supernode
    register`) and a SuperExec secret (superexec.secret). See README: Flower deployment.
    """
    from fedpeft.runtime.flower.keys import make_deployment_keys

    keys = make_deployment_keys(directory, nodes, tuple(host or ()), overwrite=force)
    out = make_console()
    out.print(f"fedpeft flower-keys: {keys.directory}", markup=False, highlight=False, soft_wrap=True)
    for what, path in (("CA certificate", keys.ca_cert), ("SuperLink certificate", keys.server_cert),
                       ("SuperLink key", keys.server_key), ("SuperExec secret", keys.superexec_secret)):
        out.print(f"  {what}: {path}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"  SuperNode keys: {keys.node_key(0).parent}/node-{{0..{nodes - 1}}}(.pub)", markup=False,
              highlight=False, soft_wrap=True)


@app.command("flower-supernode", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower_supernode(
    ctx: typer.Context,
    idle_poll: Annotated[float, typer.Option(help="Seconds an idle node waits between pulls (Flower: 3).")] = 3.0,
    runtime_port: Annotated[int, typer.Option(help="Loopback port of the node's Runtime API, for its worker.")] = 9094,
    ready_file: Annotated[Optional[Path], typer.Option(help="Touch this file once the worker is ready.")] = None,
) -> None:
    """A Flower SuperNode for fedpeft: flower-supernode (options after --) plus a warm fedpeft worker.

    Example: fedpeft flower-supernode --idle-poll 0.25 -- --superlink HOST:9092
    --node-config "partition-id=0 num-partitions=4" --root-certificates ca.crt
    """
    from fedpeft.runtime.flower.supernode import run_supernode

    logging.getLogger("fedpeft").setLevel(os.environ.get("FEDPEFT_LOG", "INFO"))
    run_supernode(ctx.args, idle_poll, runtime_port, _str(ready_file))


def _print_outcomes(outcomes: dict[str, str], out: Path) -> None:
    """The sweep's result: a line naming its folder, then each run's name and outcome.

    Parameters
    ----------
    outcomes : dict of str to str
        Run name -> ``skipped``, ``resumed``, ``ran`` or ``failed: reason`` (from ``run_sweep``).
    out : Path
        The sweep folder.
    """
    table = Table()
    table.add_column("run", no_wrap=True)  # a folder name stays whole: the outcome wraps instead
    table.add_column("outcome", overflow="fold")
    for name, outcome in outcomes.items():
        table.add_row(Text(name), Text(outcome))  # Text: brackets in a name or reason are not markup
    _print_titled(f"fedpeft sweep: {out}", table)


def _print_titled(title: str, table: Table) -> None:
    """A line ``title`` (whole, however long: a path), then ``table``, on stdout."""
    out = make_console()
    out.print(title, markup=False, highlight=False, soft_wrap=True)
    out.print(table)


def _print_summary(summary: dict, run_dir: Path) -> None:
    """A finished run's headline numbers: a line naming its folder, then one row per number.

    Parameters
    ----------
    summary : dict
        The run's summary (``summary.json``).
    run_dir : Path
        The run folder.
    """
    table = Table(show_header=False)
    scores = ("final_eval_loss", "final_perplexity", "final_exact_match", "final_rouge_l") \
        if summary.get("task") == "causal-lm" else ("final_accuracy", "best_accuracy", "final_macro_f1")
    for key in (
        "method", *scores, "trainable_params", "total_params",
        "bytes_per_client_update", "total_bytes_up", "total_bytes_down", "upload_reduction_vs_full",
        "client_flops_total", "peak_rss_mb", "wall_s",
    ):
        value = summary.get(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    _print_titled(f"fedpeft run: {run_dir}", table)


def stop_on_sigterm() -> None:
    """Make ``kill PID`` stop a run as Ctrl-C does: the last finished round is checkpointed and
    summary.json says ``interrupted`` (only ``kill -9`` leaves it ``running``)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main() -> None:
    """Console entry point: run the app and turn user errors into one line."""
    logging.basicConfig(level=os.environ.get("FEDPEFT_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    single_library_logs()  # hub libraries log through their own handler: not twice via root
    try:
        app(standalone_mode=False)
    except FedPeftError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "code", getattr(exc, "exit_code", 0)) or 0)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
