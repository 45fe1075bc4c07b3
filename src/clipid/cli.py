"""``clipid <stage>``: the commands DVC stages run. Each reads ``params.yaml`` (or ``--params``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from clipid import __version__
from clipid.checks import load_checked_params
from clipid.config import load_params
from clipid.errors import ClipidError
from clipid.stage_registry import model_stages, trained_stages

if TYPE_CHECKING:
    from clipid.search.query import SearchResult


def _fingerprint(args: argparse.Namespace) -> None:
    from clipid.stages.fingerprint import fingerprint_stage

    fingerprint_stage(load_params(args.params))


def _prepare(args: argparse.Namespace) -> None:
    from clipid.stages.prepare import prepare

    prepare(load_params(args.params))


def _clean_captions(args: argparse.Namespace) -> None:
    from clipid.stages.clean_captions import clean_captions

    clean_captions(load_params(args.params))


def _train(args: argparse.Namespace) -> None:
    from clipid.stages.launch import needs_launch
    from clipid.stages.train import launch, train_stage

    params = load_params(args.params)
    if needs_launch(params):
        launch(params, args.stage, args.params)
    else:
        train_stage(params, args.stage)


def _clipreid_prompts(args: argparse.Namespace) -> None:
    from clipid.stages.clipreid import prompts_stage

    prompts_stage(load_params(args.params))


def _evaluate(args: argparse.Namespace) -> None:
    from clipid.stages.evaluate import evaluate_stage
    from clipid.stages.launch import launch_cli, needs_launch

    params = load_params(args.params)
    if needs_launch(params):  # train.nproc > 1: the processes split the images to embed
        launch_cli(params, ["evaluate", args.stage], args.params)
    else:
        evaluate_stage(params, args.stage)


def _report(args: argparse.Namespace) -> None:
    from clipid.stages.report import report

    report(load_params(args.params), args.stages)


def _index(args: argparse.Namespace) -> None:
    from clipid.stages.index import index_stage
    from clipid.stages.launch import launch_cli, needs_launch

    params = load_params(args.params)
    if needs_launch(params):
        launch_cli(params, ["index"], args.params)
    else:
        index_stage(params)


def _search(args: argparse.Namespace) -> None:
    import json

    from clipid.runtime import setup_runtime
    from clipid.search.grid import draw_results
    from clipid.search.query import search

    # The ranked list is the output: no INFO lines of open_clip's model loading around it.
    logging.getLogger().setLevel(logging.WARNING)
    params = load_params(args.params)
    device = setup_runtime(params.runtime)
    result = search(params, image=args.image, text=args.text, model=args.model,
                    top_k=args.top_k, device=device)
    draw_results(result, args.grid)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print("\n".join(result_lines(result)))
    print(f"grid: {args.grid}")


def result_lines(result: SearchResult) -> list[str]:
    """What ``clipid search`` prints: rank and score in columns of their own, the score with
    the decimals that tell neighbours apart."""
    from clipid.search.query import score_decimals

    decimals = score_decimals([hit.score for hit in result.hits])
    width = decimals + 3
    lines = [f"{result.kind} query {result.query!r}, model {result.model}, "
             f"{result.backend} index"]
    if result.excluded:
        lines.append(f"(the query is the gallery image {result.excluded}: left out)")
    lines.append(f"{'rank':>4}  {'score':>{width}}  {'identity':<16}  image")
    lines += [f"{hit.rank:>4}  {hit.score:>{width}.{decimals}f}  {hit.item_id:<16}  {hit.image}"
              for hit in result.hits]
    return lines


def _register(args: argparse.Namespace) -> None:
    from clipid.stages.register import register_stage

    register_stage(load_params(args.params), args.stages)


def _track(args: argparse.Namespace) -> None:
    from clipid.stages.track import track_stage

    track_stage(load_params(args.params))


def _export(args: argparse.Namespace) -> None:
    from clipid.stages.export import export_stage

    export_stage(load_params(args.params), args.stage, args.out)


def _lineage(args: argparse.Namespace) -> None:
    from clipid import tracking_spool
    from clipid.files import file_sha256
    from clipid.lineage import lineage_lines, pretrained_lines, resolve_checkpoint
    from clipid.stage_registry import FORMER_PRETRAINED_NAMES, PRETRAINED
    from clipid.tracking import mlflow_client, store_root, tracking_uri

    uri = tracking_uri()
    if args.target in (PRETRAINED, *FORMER_PRETRAINED_NAMES):
        path = PRETRAINED
        lines, found = pretrained_lines(mlflow_client(uri), load_params(args.params))
    else:
        path = resolve_checkpoint(args.target)
        spooled = [e.record for e in tracking_spool.pending(store_root())]
        lines, found = lineage_lines(mlflow_client(uri), file_sha256(path), str(path), spooled)
    print(f"store {uri}")
    print("\n".join(lines))
    if not found:
        raise ClipidError(f"{path}: no MLflow run in {uri} made or evaluated these weights")


def _compare(args: argparse.Namespace) -> None:
    from clipid.compare import compare_table, experiment_rows

    print(compare_table(experiment_rows(args.experiments)))


def _tracking(args: argparse.Namespace) -> None:
    from clipid.tracking import spool_status, sync_spool, tracking_uri

    if args.action == "status":
        lines = spool_status()
        print("\n".join(lines) if lines else "no spooled MLflow runs")
        return
    for entry, run_id in sync_spool():
        print(f"replayed {entry.record.run_name} ({entry.record.id}) as run {run_id} "
              f"into {tracking_uri()}")
    left = spool_status()
    print(f"{len(left)} spooled run(s) left" + (": clipid tracking status" if left else ""))


def _serve(args: argparse.Namespace) -> None:
    from clipid.serve.app import serve

    serve(load_params(args.params), host=args.host, port=args.port)


def _server(args: argparse.Namespace) -> None:
    from clipid.tracking_server import ServerConfig, serve_tracking

    serve_tracking(ServerConfig(args.backend_store_uri, args.artifacts_destination,
                                host=args.host, port=args.port, workers=args.workers))


def _check_params(args: argparse.Namespace) -> None:
    print(f"{args.params}: ok")  # main has checked the file, as before every command


DESCRIPTION = ("The commands the DVC stages of clipid run, and the tools around them (search, "
               "serve, lineage, tracking). Each reads params.yaml, or the file --params names.")

COMMANDS = {
    "fingerprint": (_fingerprint, "list what prepare reads under data.root into "
                    "data/fingerprint.json"),
    "prepare": (_prepare, "cache the data set's images and write data/prepared/manifest.csv"),
    "clean-captions": (_clean_captions, "clean raw captions into data/prepared/image_texts.json"),
    "train": (_train, "train one fine-tuning stage into models/<stage>/"),
    "clipreid-prompts": (_clipreid_prompts, "CLIP-ReID: learn the identities' prompts into "
                         "models/clipreid_prompts/"),
    "evaluate": (_evaluate, "evaluate a stage's model (stage1: the pretrained one, no "
                 "training) into metrics/<stage>.json"),
    "report": (_report, "compare every stage in metrics/report.md"),
    "compare": (_compare, "the headline figures (i2i R1 and mAP, t2i mAP) of DVC experiments, "
                "one line per experiment and stage"),
    "index": (_index, "embed the gallery for search into models/index/<model>/"),
    "search": (_search, "rank the gallery for an image (--image) or a text (--text) query"),
    "register": (_register, "move alias champion of clipid-image/-text to the best stage"),
    "track": (_track, "make the MLflow store the complete view of this pipeline execution's "
              "outputs (runs, metrics, model versions, champion aliases)"),
    "export": (_export, "write a stage's towers as ONNX (default: search.model.image/.text)"),
    "serve": (_serve, "the search web app on the index stage's output (http://127.0.0.1:8000)"),
    "server": (_server, "the team's MLflow tracking server: a database (PostgreSQL) and "
               "proxied artifacts, one worker (README: Team setup)"),
    "check-params": (_check_params, "validate params.yaml and exit"),
    "lineage": (_lineage, "the MLflow run, experiment, DVC experiment and commit that made a "
                "checkpoint (a file, its folder or a stage name), found by its SHA-256"),
    "tracking": (_tracking, "MLflow runs spooled while the store was down: status lists them, "
                 "sync replays them into the store"),
}

INSTANT_COMMANDS = ("fingerprint",)  # only validated key by key (config.load_params)
PARAMLESS_COMMANDS = ("server",)  # a tracking server's machine needs no params.yaml


def _search_arguments(cmd: argparse.ArgumentParser) -> None:
    query = cmd.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", type=Path, help="find the gallery images of this item")
    query.add_argument("--text", help='find the gallery images matching "a red striped shirt"')
    cmd.add_argument("--top-k", type=int, default=None,
                     help="results to show (default: search.top_k)")
    cmd.add_argument("--model", choices=model_stages(), default=None,
                     help="the stage whose model ranks (default: search.model.image or .text)")
    cmd.add_argument("--json", action="store_true", help="print the results as JSON")
    cmd.add_argument("--grid", type=Path, default=Path("search.png"),
                     help="PNG of the query and its results (default: search.png)")


def _server_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--backend-store-uri", required=True,
                     help="the database: postgresql://user:password@host:5432/mlflow")
    cmd.add_argument("--artifacts-destination", required=True,
                     help="where the server keeps artifacts: a folder or s3://bucket/prefix")
    cmd.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1; 0.0.0.0 for the team's network)")
    cmd.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    cmd.add_argument("--workers", type=int, default=1,
                     help="uvicorn worker processes (default 1: enough for a team)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipid", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"clipid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name not in PARAMLESS_COMMANDS:
            cmd.add_argument("--params", type=Path, default=Path("params.yaml"),
                             help="parameter file (default: params.yaml)")
        if name == "train":
            cmd.add_argument("stage", choices=trained_stages(), help="the stage")
        if name == "evaluate":
            cmd.add_argument("stage", choices=model_stages(), help="the stage")
        if name == "report":
            cmd.add_argument("stages", nargs="+", choices=model_stages(),
                             help="stages to compare, in order")
        if name == "register":
            cmd.add_argument("stages", nargs="+", choices=model_stages(),
                             help="stages that compete, in order")
        if name == "export":
            cmd.add_argument("stage", nargs="?", choices=model_stages(),
                             help="the stage (default: search.model.image and .text)")
            cmd.add_argument("--out", type=Path, default=None,
                             help="output folder (default: models/export/<stage>)")
        if name == "search":
            _search_arguments(cmd)
        if name == "lineage":
            cmd.add_argument("target", help="models/stage2/model.safetensors, models/stage2 or "
                             "stage2")
        if name == "compare":
            cmd.add_argument("experiments", nargs="*", metavar="EXP",
                             help="experiments (names or revisions; default: the workspace, "
                             "its commit and every experiment that dvc exp show lists)")
        if name == "tracking":
            cmd.add_argument("action", choices=("status", "sync"),
                             help="status: list the runs spooled while the store was down "
                             "(when, stage, what, which store); sync: replay them into the store "
                             "(MLFLOW_TRACKING_URI or ./mlflow.db)")
        if name == "server":
            _server_arguments(cmd)
        if name == "serve":
            cmd.add_argument("--host", help="address to bind (default: serve.host, 127.0.0.1)")
            cmd.add_argument("--port", type=int, help="port (default: serve.port)")
        cmd.set_defaults(func=func)
    return parser


# INFO lines of libraries that say nothing a user of a stage acts on: open_clip's "Parsing model
# identifier" (logged on the root logger, several per stage), MLflow's schema set-up ("Creating
# initial MLflow database tables") and registry wait ("Waiting up to 300 seconds ...").
QUIET_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store",
                 "alembic.runtime.migration")


def _not_library_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "open_clip" not in record.pathname


def configure_logging() -> None:
    """clipid's INFO lines and every warning; libraries' INFO chatter left out."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_library_info)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        # Every command checks the whole parameter file before it reads any data, except the
        # fingerprint: it runs on every `dvc repro` and reads no data, only its listing, so it
        # must stay instant (the checks import open_clip for a pretrained tag); prepare, the
        # stage right after it, checks the file before it reads anything.
        if args.command not in INSTANT_COMMANDS + PARAMLESS_COMMANDS:
            load_checked_params(args.params)
        args.func(args)
    except ClipidError as exc:
        # One line, however the message was built: what is wrong and where.
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"clipid {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        _say_untracked(args.command)
    return 0


def _say_untracked(command: str) -> None:
    """A run that could not be tracked is the last thing a stage says (a queue's log is read
    from the end). A command that never imported the tracker tracked nothing: importing it
    now would cost the fingerprint its speed."""
    tracking = sys.modules.get("clipid.tracking")
    for line in getattr(tracking, "UNTRACKED", []):
        print(f"clipid {command}: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
