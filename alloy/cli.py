"""`alloy <command>`: one entry point; each command lives in its own module and takes argv."""

from __future__ import annotations

import gc
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("alloy.cmd_merge:main", "merge models from a mergekit-style YAML"),
    "multimerge": ("alloy.cmd_multimerge:main", "merge recipes that build on each other (mergekit-multi's YAML)"),
    "extract-lora": ("alloy.cmd_extract_lora:main", "a fine-tune as a LoRA adapter of its base (SVD of each layer's difference)"),
    "moe": ("alloy.cmd_moe:main", "dense models as the experts of a Mixtral mixture (mergekit-moe's YAML)"),
    "eval": ("alloy.cmd_eval:main", "evaluate a model with lm-eval on the bundled skills or any lm-eval task"),
    "quant-check": ("alloy.cmd_quant:main", "check that a model survives int8/int4 quantisation"),
    "import-gguf": ("alloy.cmd_import_gguf:main", "turn a GGUF file into a Hugging Face safetensors checkpoint"),
    "demo-family": ("alloy.cmd_demo:main", "build a demo model family (tiny from scratch, or SmolLM2 LoRA)"),
    "run": ("alloy.cmd_pipeline:run", "run the merge pipeline (Prefect flow) on params.yaml"),
    "serve": ("alloy.cmd_pipeline:serve", "serve the pipeline on a cron schedule"),
    "report": ("alloy.cmd_report:main", "build the HTML report of a pipeline run"),
    "ui": ("alloy.cmd_report:ui", "start the MLflow UI on the project's store"),
    "gram": ("alloy.cmd_gram:main", "Gram matrices of a model's layer inputs on its data (for regmean)"),
    "inspect": ("alloy.cmd_inspect:main", "task-vector similarity, sign conflicts and trim fractions of a config"),
    "search": ("alloy.cmd_search:main", "Optuna search over merge recipes"),
}


def _usage() -> str:
    lines = ["usage: alloy <command> [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    # OpenMP's default busy-waiting makes torch's threads burn 4-6x the CPU of the work on a shared machine
    # (measured on a 2-core box under load: LoRA training stalled); it must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"alloy: error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    # Importing torch and friends builds ~10^6 long-lived objects; the cyclic GC would walk them over and over while
    # they load and once more at exit. In the `alloy` process itself (argv None; not when a caller's process runs
    # main, whose garbage must stay collectable), the GC is off during the imports, then everything is frozen (moved
    # out of its reach), and frozen again at the end: `alloy merge` starts 0.3 s and exits 0.4 s sooner (measured
    # here; the merge itself is unchanged).
    own_process = argv_given is None
    if own_process:
        gc.disable()
    try:
        fn = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        if e.name == module:
            print(f"alloy: error: command {name!r} is not available yet", file=sys.stderr)
            return 2
        raise
    finally:
        if own_process:
            gc.freeze()
            gc.enable()
    try:
        return _run(fn, rest, debug)
    finally:
        # ...except where triton got imported (by transformers or lm-eval through torch): its nanobind bindings
        # print every object still alive at exit as a leak, a hundred lines after each `alloy run` or `alloy eval`
        if own_process and "triton" not in sys.modules:
            gc.freeze()


def _run(fn, rest: list[str], debug: bool) -> int:
    from merging.errors import AlloyError

    try:
        return int(fn(rest) or 0)
    except AlloyError as e:
        if debug or os.environ.get("ALLOY_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"alloy: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alloy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
