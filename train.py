"""Fine-tune Aria: ``python train.py --config configs/RECIPE.yaml [key=value ...]``.

Keys are the original Aria recipe's (model_name_or_path, dataset_mixer, freeze_*, use_peft, lora_*, moe_*_coeff,
learning_rate, ... ; see aria_jax/training/config.py). Exit status 2 with one line on a bad recipe, dataset, model,
checkpoint or file system (a full disk); output_dir is written only once the run's setup has succeeded.

Multi-host: run the same command in every process with JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N
and JAX_PROCESS_ID=0..N-1 set (TPU pods and SLURM are detected without them); process 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/lora.yaml, configs/full.yaml, configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of recipe keys (YAML values)")
    args = parser.parse_args(argv)

    from aria_jax.errors import InputError, one_line, os_error_line
    from aria_jax.parallel import distributed
    from aria_jax.training.config import describe, load_config

    try:
        distributed.initialize()
    except ValueError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        main_process = distributed.is_main_process()
        if main_process:
            print(describe(cfg), flush=True)
        from aria_jax.training.trainer import run

        metrics = run(cfg)  # writes output_dir (train_config.yaml first) only once its setup has succeeded
    except InputError as exc:  # RecipeError, ConfigError, CheckpointError, ImageError, ...: bad input, one line
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system: a full disk, a read-only or vanished output_dir
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    if main_process:
        print(f"done: step {metrics.get('step')} lm_loss {metrics.get('lm_loss', float('nan')):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
