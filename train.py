"""Fine-tune Aria: ``python train.py --config configs/RECIPE.yaml [--key value | --key=value | key=value ...]``.

The recipes of the original rhymes-ai/Aria (recipes/config_{lora,full}.yaml, examples/*/config_*.yaml) run
unchanged, with their command-line forms (``--output_dir out --learning_rate 1e-5``). Every key a recipe may carry
(the original Aria keys, transformers' TrainingArguments, TRL's SFTConfig / ModelConfig / ScriptArguments) is
either honoured, accepted with one line saying why it has no effect here, or refused with the reason:
``python train.py --list-keys`` prints them all (aria_jax/training/recipe_keys.py). Exit status 2 with one line on
a bad recipe, dataset, model, checkpoint or file system (a full disk); output_dir is written only once the run's
setup has succeeded.

Compiled programs are kept in JAX's persistent compilation cache (``~/.cache/aria-jax/xla``, or
``$JAX_COMPILATION_CACHE_DIR``), so a second run of the same recipe starts without compiling again;
``--no-compile-cache`` or ``ARIA_JAX_NO_COMPILE_CACHE=1`` turns it off.

Multi-host: run the same command in every process with JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N
and JAX_PROCESS_ID=0..N-1 set (TPU pods and SLURM are detected without them); process 0 prints and writes files.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def parse_command_line(argv: list[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """The arguments -> (recipe path, overrides in order): ``--config FILE`` (or ``--config=FILE``), and overrides
    as ``key=value``, ``--key=value`` or ``--key value`` (TrlParser's form). A list key takes every value up to the
    next ``--key`` or ``key=value``; ``--flag`` alone is true, ``--no_flag`` false (a true/false key)."""
    from aria_jax.training.config import RecipeError, field_kind, parse_flag, parse_override
    from aria_jax.training.recipe_keys import KEYS

    def is_override(item: str) -> bool:  # ends a list of values: --key, or key=value of a key in the table
        return item.startswith("--") or ("=" in item and item.split("=", 1)[0].strip() in KEYS)

    path, overrides, i = None, [], 0
    while i < len(argv):
        item, i = argv[i], i + 1
        if item == "--config" or item.startswith("--config="):
            if "=" in item:
                path = item.split("=", 1)[1]
            elif i < len(argv):
                path, i = argv[i], i + 1
            else:
                raise RecipeError("--config: expected a recipe file after it")
            continue
        if not item.startswith("--") or "=" in item:
            overrides.append(parse_override(item))
            continue
        key, values = item.lstrip("-").replace("-", "_"), []
        while i < len(argv) and not is_override(argv[i]) and (not values or field_kind(key).startswith("list")):
            values.append(argv[i])
            i += 1
        if not values:
            bare = key[3:] if key.startswith("no_") and not field_kind(key) else ""
            overrides.append((bare, False) if field_kind(bare) == "bool" else (key, True))
        elif len(values) == 1:
            overrides.append((key, parse_flag(key, values[0])))
        else:
            overrides.append((key, [parse_flag(key, v) for v in values]))
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    if "--list-keys" in argv or "--list_keys" in argv:
        from aria_jax.training.recipe_keys import table

        try:
            print(table())
        except BrokenPipeError:  # `| head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    from aria_jax import compile_cache
    from aria_jax.errors import InputError, one_line, os_error_line
    from aria_jax.parallel import distributed
    from aria_jax.training.config import describe, load_recipe
    from aria_jax.training.metrics_log import Log

    argv, no_cache = compile_cache.strip_flag([compile_cache.FLAG if a == "--no_compile_cache" else a for a in argv])
    compile_cache.enable(off=no_cache)
    try:
        distributed.initialize()
    except ValueError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        path, overrides = parse_command_line(argv)
        cfg, notes = load_recipe(path, overrides)
        log = Log(cfg.log_level, enabled=distributed.is_main_process())
        log(describe(cfg))
        for note in notes:
            log(note)
        if cfg.env:  # TrlParser's env: set before anything reads them (W&B, the hub)
            os.environ.update({name: str(value) for name, value in cfg.env.items()})
        from aria_jax.training.trainer import run

        metrics = run(cfg, log)  # writes output_dir (train_config.yaml first) only once its setup has succeeded
    except InputError as exc:  # RecipeError, ConfigError, CheckpointError, ImageError, ...: bad input, one line
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system: a full disk, a read-only or vanished output_dir
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    evaluated = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
    log(f"done: step {metrics.get('step')} lm_loss {metrics.get('lm_loss', float('nan')):.4f}{evaluated}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
