"""The ``cvgen`` command.

Training goes through LightningCLI (``fit``, ``validate``, ``test``, ``predict``); the other
commands (``model``, ``data``, ``serve``, ``generate``) are plain tools. Each tool command is
a module with ``add_parser(subparsers)``; listing it in ``TOOLS`` is all it takes to add one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from cvgen.errors import CVGenError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# import names of the packages that only `pip install "cvgen[train]"` brings
TRAIN_PACKAGES = frozenset(
    {"lightning", "jsonargparse", "dvc", "litdata", "matplotlib", "skimage", "torchvision"}
)
# ... and `pip install "cvgen[monitor]"` (Evidently and what it imports; OpenCV for faces)
MONITOR_PACKAGES = frozenset({"evidently", "pandas", "scipy", "plotly", "cv2"})
# ... and `pip install "cvgen[tune]"` (training plus Optuna and its storage)
TUNE_PACKAGES = TRAIN_PACKAGES | {"optuna", "sqlalchemy", "alembic", "colorlog"}
# extra -> (its import names, what the error calls it); commands not listed need `train`
EXTRAS = {
    "train": (TRAIN_PACKAGES, "the training dependencies"),
    "monitor": (MONITOR_PACKAGES, "the monitoring dependencies"),
    "tune": (TUNE_PACKAGES, "the tuning dependencies"),
}
COMMAND_EXTRA = {"monitor": "monitor", "tune": "tune"}
# command -> module with add_parser(subparsers) that sets `func` on its parser
TOOLS = {
    "init": "cvgen.commands.init",
    "model": "cvgen.commands.model",
    "data": "cvgen.commands.data",
    "serve": "cvgen.serve.cli",
    "generate": "cvgen.serve.generate",
    "monitor": "cvgen.commands.monitor",
    "tune": "cvgen.commands.tune",
    "promote": "cvgen.commands.promote",
}

USAGE = """usage: cvgen <command> [options]

Training (LightningCLI; `cvgen fit --help` for every option):
  fit        train a LoRA:            cvgen fit --config configs/demo.yaml
  validate   validation loss/samples: cvgen validate --config ... --ckpt_path last
  test       loss on the held-out set
  predict    img2img on the held-out photos
  tune       hyperparameter search:   cvgen tune --config C --sweep configs/sweep.yaml --trials N

Tools:
  init       a working folder:        cvgen init DIR   (the shipped configs in DIR/configs/)
  model      build models:            cvgen model random --arch tiny --out models/tiny
  data       datasets:                cvgen data sample --out data/sample
  serve      HTTP img2img server:     cvgen serve --config configs/serve.yaml
  generate   one image, no server:    cvgen generate --image in.jpg --prompt ... --out out.jpg
  monitor    data drift:              cvgen monitor drift --reference R --current LOG --out DIR
  promote    move a W&B alias:        cvgen promote wandb://ORG/REGISTRY/COLLECTION:v3 --alias staging
"""


def _available_tools() -> dict[str, str]:
    out = {}
    for name, module in TOOLS.items():
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            out[name] = module
    return out


def missing_extra(command: str, error: ModuleNotFoundError) -> CVGenError | None:
    """The error to show when ``command`` failed for want of a package of its extra
    (``cvgen[train]``, or ``cvgen[monitor]`` for ``cvgen monitor``)."""
    top = (error.name or "").split(".")[0]
    extra = COMMAND_EXTRA.get(command, "train")
    packages, what = EXTRAS[extra]
    if top not in packages:
        return None
    return CVGenError(
        f"'cvgen {command}' needs {what} ({top} is not installed): pip install 'cvgen[{extra}]'"
    )


def run_tool(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="cvgen")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _available_tools().values():
        importlib.import_module(module).add_parser(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from cvgen.perf import flush_denormal_enabled

    # the flush-denormal speed lever is process-global CPU state: give it back as found,
    # so calling main() in-process (tests, notebooks) leaves the caller's floats alone
    flushing = flush_denormal_enabled()
    try:
        return _main(args, argv is None)
    finally:
        import torch

        torch.set_flush_denormal(flushing)


def _main(args: list[str], from_sys_argv: bool) -> int:
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE)
            return 0 if args else 2
        if args[0] in TOOLS:
            if args[0] not in _available_tools():
                print(
                    f"cvgen: error: command {args[0]!r} is not available in this install",
                    file=sys.stderr,
                )
                return 2
            return run_tool(args)
        if args[0] not in LIGHTNING_COMMANDS and not args[0].startswith("-"):
            print(f"cvgen: error: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        from cvgen.training.cli import run_cli

        run_cli(None if from_sys_argv else args)
        return 0
    except ModuleNotFoundError as e:
        err = missing_extra(args[0], e)
        if err is None:
            raise
        print(f"cvgen: error: {err}", file=sys.stderr)
        return 2
    except CVGenError as e:
        print(f"cvgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
