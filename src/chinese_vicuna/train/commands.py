"""The ``train`` and ``plan`` commands (registered by cli.build_parser; heavy imports inside each)."""

from __future__ import annotations

import argparse
import textwrap

from ..config import field_help


def _train_epilog() -> str:
    lines = ["config keys (YAML and --key value use the same names):"]
    for key, default, doc in field_help():
        lines.append(f"  --{key} (default {default})")
        if doc:
            lines += ["      " + w for w in textwrap.wrap(doc, 90)]
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import load_config
    from .trainer import run_training

    cfg = load_config(args.config, extra)
    if getattr(args, "process_entry", False) and cfg.train.launcher == "local":
        from . import heap

        lib = heap.wanted(cfg.train.cpu_allocator)
        if lib:  # before torch allocates anything: the whole run on jemalloc (same process ID)
            heap.reexec_with(lib)
    if cfg.train.launcher == "ray":
        from .launch_ray import run_ray

        print(f"adapter written to {run_ray(cfg)}")
        return 0
    trainer = run_training(cfg)
    if trainer.accelerator.is_main_process and getattr(trainer, "stopped_at", None):
        print(f"stopped at step {trainer.stopped_at}; checkpoint in {cfg.train.output_dir} "
              "(continue with --resume auto)")
    elif trainer.accelerator.is_main_process:
        print(f"adapter written to {cfg.train.output_dir}")
    return 0


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from .plan import cmd_plan as run

    return run(args, extra)


def register(subparsers, groups=None) -> None:
    """Add ``train`` and ``plan`` (called by cli.build_parser)."""
    p = subparsers.add_parser(
        "train",
        help="LoRA / QLoRA / full fine-tuning from a YAML config plus --key value overrides",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML preset (configs/*.yaml); optional")
    p.set_defaults(func=cmd_train, allow_extra=True)

    p = subparsers.add_parser(
        "plan",
        help="predict a training run's peak memory (no weights loaded) and the largest batch/length that fits",
        description="Takes exactly the train command's config and --key value flags.",
    )
    p.add_argument("config", nargs="?", help="YAML preset (configs/*.yaml); optional")
    p.add_argument("--device-memory", default=None, help="memory to fit in, e.g. 24GiB or 11GB")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="plan for this device (default: this machine's)")
    p.add_argument("--assume-full", action="store_true", help="every sample at cutoff_len (do not read the data)")
    p.set_defaults(func=cmd_plan, allow_extra=True)
