"""What a few rows per expert cost on this machine: the batch-8 decode step's routed experts (issue 23).

At batch 8 with top-6 of 32 experts, most used experts get 1-3 rows. This probe runs ``--experts`` SwiGLU experts
(one (D, 2F) and one (F, D) float32 array each, as the ``unrolled`` layout holds them) on ``rows`` rows each, in one
compiled program per form, with the decode step's compiler options (``runtime.CPU_DECODE_OPTIONS`` on CPU):

- ``matvec``: one matvec pass per row (``kernels.matmul.project``'s single-row form, the decode kernel today);
- ``matmul``: the expert's rows as one matmul;
- ``split``: one matmul split over two halves of the contraction (a batch of two, one per core);
- ``reduce``: broadcast multiply + sum over the contraction (reads each weight once, whatever the rows).

    python bench/expert_rows.py                       # the mid shape: 32 experts of 512 x 384, 1-4 rows
    python bench/expert_rows.py --hidden 768 --width 1024 --experts 16 --rows 1,2,4

Prints the best of ``--repeats`` runs per (rows, form) in ms and the bandwidth of a single pass (bytes of all the
experts over the ``matvec`` time at 1 row). Forms are interleaved per repeat (the VM drifts between minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # aria_jax from this checkout where it is not installed

from common import fail, positive_ints  # noqa: E402

FORMS = ("matvec", "matmul", "split", "reduce")


def build(form: str, options: dict):
    import jax
    import jax.numpy as jnp

    from aria_jax.kernels.activations import swiglu
    from aria_jax.kernels.matmul import project

    def split_matmul(x, w):
        half, n = w.shape[0] // 2, x.shape[0]
        parts = jnp.einsum("snk,skf->snf", x.reshape(n, 2, half).transpose(1, 0, 2), w.reshape(2, half, -1))
        return parts.sum(0)

    kernels = {
        "matmul": lambda x, w: x @ w,
        "split": split_matmul,
        "reduce": lambda x, w: jnp.sum(x[:, :, None] * w[None], axis=1),
    }

    def run(x, gate_up, down):  # x (E, rows, D)
        outs = []
        for e in range(len(gate_up)):
            if form == "matvec":
                outs += [project(swiglu(project(row[None], gate_up[e], split=2)), down[e], split=2)[0]
                         for row in x[e]]
            else:
                outs.append(kernels[form](swiglu(kernels[form](x[e], gate_up[e])), down[e]))
        return jnp.stack(outs)

    return jax.jit(run, compiler_options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="D (default: the mid shape's 512)")
    parser.add_argument("--width", type=int, default=384, help="F, each expert's intermediate width (default 384)")
    parser.add_argument("--experts", type=int, default=32, help="experts in the program (default 32: one layer)")
    parser.add_argument("--rows", default="1,2,3,4", help="rows per expert, comma-separated (default 1,2,3,4)")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.error = fail  # one line and exit status 2, not argparse's usage block
    args = parser.parse_args()
    rows = positive_ints("--rows", args.rows)
    forms = [f for f in args.forms.split(",") if f]
    if not forms or any(f not in FORMS for f in forms):
        fail(f"--forms: '{args.forms}' must name some of {', '.join(FORMS)}")
    if min(args.hidden, args.width, args.experts, args.repeats) < 1 or args.hidden % 2:
        fail("--hidden (even), --width, --experts and --repeats must be positive")

    import jax
    import numpy as np

    from aria_jax.runtime import CPU_DECODE_OPTIONS

    options = dict(CPU_DECODE_OPTIONS) if jax.default_backend() == "cpu" else {}
    rng = np.random.default_rng(0)
    d, f, e = args.hidden, args.width, args.experts
    gate_up = [jax.device_put(rng.standard_normal((d, 2 * f), np.float32) * 0.05) for _ in range(e)]
    down = [jax.device_put(rng.standard_normal((f, d), np.float32) * 0.05) for _ in range(e)]
    megabytes = e * (d * 2 * f + f * d) * 4 / 1e6
    print(f"{e} experts of {d} x {f} ({megabytes / e:.2f} MB each, {megabytes:.1f} MB in all); best of "
          f"{args.repeats} runs, ms", flush=True)
    print("rows | " + " | ".join(forms))
    for n in rows:
        x = jax.device_put(rng.standard_normal((e, n, d), np.float32))
        programs = {form: build(form, options) for form in forms}
        best = dict.fromkeys(forms, float("inf"))
        for program in programs.values():  # compile and warm up
            jax.block_until_ready(program(x, gate_up, down))
        for _ in range(args.repeats):
            for form, program in programs.items():
                start = time.perf_counter()
                jax.block_until_ready(program(x, gate_up, down))
                best[form] = min(best[form], (time.perf_counter() - start) * 1000)
        print(f"{n} | " + " | ".join(f"{best[form]:.2f}" for form in forms), flush=True)
        if n == 1 and "matvec" in best:
            print(f"  one pass over the weights (matvec, 1 row): {megabytes / best['matvec']:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
