"""The training loop: model + data setup, jitted micro-steps with gradient accumulation, logging, checkpoints.

Nothing is written before the setup (recipe, datasets and their images, model, resumed checkpoint) has succeeded:
``output_dir`` is checked first (a writable directory, or one that can be created), created and given its
``train_config.yaml`` only once the run starts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util
from tqdm import tqdm

from aria_jax.checkpoint import peft
from aria_jax.config import AriaConfig
from aria_jax.errors import InputError, one_line
from aria_jax.files import ModelNotFoundError, resolve_model, staged_directory
from aria_jax.inference.api import Aria
from aria_jax.inference.processor import AriaProcessor
from aria_jax.model.aria import AriaModel
from aria_jax.parallel import distributed
from aria_jax.parallel import layout as param_layout
from aria_jax.runtime import Runtime, detect
from aria_jax.training import checkpoint as ckpt
from aria_jax.training import data as D
from aria_jax.training import dataset as J
from aria_jax.training import evaluate as E
from aria_jax.training import qlora as Q
from aria_jax.training import steps as S
from aria_jax.training.config import MAX_STEPS, RecipeError, TrainConfig, recipe_dict, save_resolved
from aria_jax.training.export import export_adapter, export_hf
from aria_jax.training.lora import RULES, init_lora, merge_lora, select_rules
from aria_jax.training.metrics_log import MetricsLog, reporters, warn
from aria_jax.training.plan import (
    Plan,
    Rows,
    batch_rows,
    check_output_dir,
    dtype_of,
    float32,
    global_batch,
    make_train_mesh,
    onto_mesh,
    place,
)

TIMING_KEYS = ("tokens_per_s", "step_time_s", "tflops")


@dataclasses.dataclass
class Setup:
    cfg: TrainConfig
    config: AriaConfig
    params: dict  # all base params (in the weight dtype: torch_dtype)
    processor: object | None
    module: AriaModel
    trainable: dict  # nested: the parameters (or LoRA pairs) being optimised
    frozen: dict  # nested: the rest of the base params (all of them under LoRA)
    rules: list  # LoRA rules in use (empty for full fine-tuning)
    loader: D.Loader
    num_samples: int
    mesh: jax.sharding.Mesh | None = None
    rows: Rows = Rows()
    layerwise: bool = False  # trainable / frozen / optimizer state per layer (param_layout.unroll_layers)
    spare_grads: list = dataclasses.field(default_factory=list)  # consumed gradient trees, donated (make_grad_fn)
    base_dir: str | None = None  # the model (or tokenizer) directory, hub ids resolved: its files go with exports
    skipped: int = 0  # samples left out before step 0 for an unreadable image (skip_bad_samples)
    batch: int = 0  # rows of one global micro-batch: per_device_train_batch_size x data-parallel devices
    eval_set: E.EvalSet | None = None  # the test samples (eval_strategy), None: no evaluation
    weight_dtype: str = "float32"  # the frozen weights' dtype (torch_dtype)


def resolve_path(cfg: TrainConfig, key: str) -> str | None:
    """``model_name_or_path`` / ``tokenizer_path``: a local directory, or a hub id downloaded (or found in the cache);
    a failure is a RecipeError naming the key and the id."""
    value = getattr(cfg, key)
    if value is None:
        return None
    try:
        return resolve_model(value, cfg.model_revision)
    except ModelNotFoundError as exc:
        raise RecipeError(f"config key '{key}': {one_line(exc)}") from None


WEIGHT_DTYPES = {None: "float32", "float32": "float32", "bfloat16": "bfloat16", "auto": None}


def load_model(cfg: TrainConfig, mesh=None) -> tuple[AriaConfig, dict, object | None, str | None]:
    """(config, params in the torch_dtype (auto: the checkpoint's), processor, base directory) of the recipe's
    model: a local HF or converted directory, or a hub id at model_revision."""
    model_dir = resolve_path(cfg, "model_name_or_path")
    key = "model_config" if model_dir is None else "model_name_or_path"
    dtype = WEIGHT_DTYPES[cfg.torch_dtype]
    try:
        if model_dir is None:
            config = AriaConfig.from_dict(cfg.model_config)
            model = Aria.from_config(config, seed=cfg.seed, dtype=dtype or "float32", layout="stacked",
                                     quantize=cfg.quantize_base)
        else:
            # training runs the stacked (scanned) layout; on a mesh each tensor is placed as it is read (quantized
            # on the host first with quantize_base)
            model = Aria.from_pretrained(model_dir, dtype=dtype, mesh=mesh, layout="stacked",
                                         quantize=cfg.quantize_base)
    except InputError as exc:
        raise RecipeError(f"config key '{key}': {one_line(exc)}") from None
    Q.check_loaded(cfg, model.runtime.quant, key)
    processor = model.processor
    tokenizer_dir = resolve_path(cfg, "tokenizer_path")
    if tokenizer_dir is not None:

        try:
            processor = AriaProcessor.from_pretrained(tokenizer_dir)
        except InputError as exc:
            raise RecipeError(f"config key 'tokenizer_path': {one_line(exc)}") from None
    return model.config, model.params, processor, model_dir or tokenizer_dir


def build_loader(cfg: TrainConfig, config: AriaConfig, processor, records, rows: Rows | None = None,
                 sizes: dict | None = None, log: Callable[[str], None] = print, batch: int | None = None
                 ) -> tuple[D.Loader, int]:
    """The loader of global batches of ``batch`` rows (default per_device_train_batch_size); on multi-host it
    builds only this process's block of rows of each. ``sizes``: the image sizes ``check_images`` read."""
    if records is None:
        seq = min(cfg.max_seq_length, 48)
        source = D.synthetic_source(config, cfg.synthetic_samples, seq, cfg.seed)
        measure = D.synthetic_measure(config, seq)
        pad_id, size, side = 0, cfg.synthetic_samples, config.vision.image_size
    else:
        if processor is None:
            raise RecipeError("config key 'model_name_or_path': the model directory has no tokenizer "
                              "(set tokenizer_path)")
        J.check_placeholders(records, processor.image_token)
        encoder = D.JsonlEncoder(processor, cfg.max_image_size, cfg.split_image, sizes)
        bad_images = D.BadImages(cfg.skip_bad_samples, jax.process_count(), log)
        source = D.build_source(records, encoder, cfg.max_seq_length, bad_images)
        measure = D.build_measure(records, encoder, cfg.max_seq_length)
        pad_id, size, side = processor.pad_token_id or 0, len(records), cfg.max_image_size
    pixel_shape = (config.vision.num_channels, side, side)
    collate = lambda samples, layout: D.collate(samples, pad_id, cfg.max_seq_length, pixel_shape, layout)
    seed, rows = cfg.seed if cfg.data_seed is None else cfg.data_seed, rows or Rows()
    loader = D.Loader(size, source, batch or cfg.per_device_train_batch_size, seed, collate, measure, rows.index,
                      rows.count, rows.image_multiple)
    return loader, size


def load_records(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[list | None, int, dict]:
    """The recipe's samples (None: synthetic), how many were left out for an unreadable image, the image sizes."""
    if cfg.dataset_mixer is None:
        return None, 0, {}
    records = J.load_datasets(cfg.dataset_mixer, cfg.dataset_train_split)
    return J.check_images(records, cfg.skip_bad_samples, log, progress=distributed.is_main_process())


def peft_adapter(cfg: TrainConfig, config: AriaConfig, log: Callable[[str], None]) -> tuple[TrainConfig, dict, list]:
    """``peft_model_path``: the adapter's LoRA pairs to continue training, its sites, and the recipe with the
    adapter's rank, scale and dropout in place of lora_r / lora_alpha / lora_dropout (as the original's
    ``PeftModel.from_pretrained(..., is_trainable=True)`` takes them from adapter_config.json)."""
    try:
        adapter = peft.load_adapter(cfg.peft_model_path, config)
    except InputError as exc:
        raise RecipeError(f"config key 'peft_model_path': {one_line(exc)}") from None
    paths = {site.path for site in adapter.sites}
    rules = [rule for rule in RULES if rule.path in paths]
    log(f"peft_model_path {cfg.peft_model_path}: training its LoRA pairs on {len(rules)} sites (r {adapter.r}, "
        f"scale {adapter.scale:g}, dropout {adapter.dropout:g}: the adapter's, not lora_r / lora_alpha / lora_dropout)")
    cfg = dataclasses.replace(cfg, lora_r=adapter.r, lora_alpha=adapter.scale * adapter.r, lora_dropout=adapter.dropout)
    return cfg, jax.tree.map(jnp.asarray, adapter.lora), rules


def build(cfg: TrainConfig, log: Callable[[str], None] = print) -> Setup:
    mesh = make_train_mesh(cfg.mesh)
    records, skipped, sizes = load_records(cfg, log)  # fail fast on bad data, before the model is loaded
    eval_records, eval_sizes = E.load_eval_records(cfg, log, progress=distributed.is_main_process())
    batch = global_batch(cfg.per_device_train_batch_size, mesh)
    rows = batch_rows(mesh, batch)
    config, params, processor, base_dir = load_model(cfg, mesh)
    quant, runtime = Q.base_quant(cfg), detect()
    params = place(params, config, mesh, cfg.fsdp, quant, runtime.int4_packed)
    weight_dtype = dtype_of(params)
    if weight_dtype != "float32":
        log(f"torch_dtype {cfg.torch_dtype}: frozen weights in {weight_dtype}, trained weights in a float32 master "
            f"copy (the original trains them in {weight_dtype} too); the export is written in float32")
    if quant is not None:
        runtime = runtime.replace(quant=quant)
        log(Q.describe(params, config, quant))
    layerwise = not resolve_scan_layers(cfg.scan_layers, runtime)
    log(f"runtime: {runtime.describe()}; training layout {'per_layer' if layerwise else 'stacked'}")
    module = AriaModel(config, moe_backend=cfg.moe_backend, dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32,
                       remat=cfg.gradient_checkpointing, mesh=mesh, layout="per_layer" if layerwise else "stacked",
                       runtime=runtime)
    frozen_parts = S.frozen_parts(cfg)
    if cfg.peft_model_path is not None and not cfg.use_peft:
        warn(log, "peft_model_path: not used without use_peft: true (as in the original trainer)")
    if cfg.use_peft and cfg.peft_model_path is not None:
        cfg, trainable, rules = peft_adapter(cfg, config, log)
        trainable, frozen = float32(trainable), params
    elif cfg.use_peft:
        try:
            rules = select_rules(cfg.lora_target_modules, frozen_parts, config)
        except ValueError as exc:
            raise RecipeError(f"config key 'lora_target_modules': {exc}") from None
        if not rules:
            raise RecipeError("config key 'lora_target_modules': no LoRA target is in an unfrozen part of the model")
        trainable = float32(init_lora(params, rules, cfg.lora_r, jax.random.key(cfg.seed), config))
        frozen = params
    else:
        rules = []
        tr, fr = S.split_params(params, lambda p: S.part_of(p) not in frozen_parts)
        if not tr:
            raise RecipeError("config: freeze_vit, freeze_projector and freeze_llm freeze everything; "
                              "nothing to train")
        trainable, frozen = float32(traverse_util.unflatten_dict(tr)), traverse_util.unflatten_dict(fr)
    n_layers = config.text.num_hidden_layers
    bad = [i for i in cfg.freeze_llm_layers if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise RecipeError(f"config key 'freeze_llm_layers': layer {bad[0]!r} is not in 0..{n_layers - 1}")
    if layerwise:  # LoRA pairs and masks were made on the stacked layout; checkpoints and exports stay stacked
        trainable, frozen = param_layout.unroll_layers(trainable), param_layout.unroll_layers(frozen)
        params = frozen if cfg.use_peft else traverse_util.unflatten_dict(
            {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})
    loader, size = build_loader(cfg, config, processor, records, rows, sizes, log, batch)
    videos = sum(r.video is not None for r in records or [])
    if videos:  # one pixel size per batch: frames take the recipe's, as the original trainer's (Aria's demo: 490)
        log(f"video samples: {videos}; each frame one image at max_image_size {cfg.max_image_size} "
            f"({processor.tokens_per_image(cfg.max_image_size)} tokens), never split")
    if records is not None:
        log(f"max_seq_length {cfg.max_seq_length}: a sample that truncation would cut through an image is dropped "
            "and counted (dropped_samples), not cut as the original trainer cuts it")
    eval_batch = global_batch(cfg.per_device_eval_batch_size, mesh)
    pixel_shape = (config.vision.num_channels, cfg.max_image_size, cfg.max_image_size)
    eval_set = E.build_eval(cfg, processor, eval_records, eval_sizes, batch_rows(mesh, eval_batch), eval_batch,
                            pixel_shape, log)
    return Setup(cfg, config, params, processor, module, trainable, frozen, rules, loader, size, mesh, rows, layerwise,
                 base_dir=base_dir, skipped=skipped, batch=batch, eval_set=eval_set, weight_dtype=weight_dtype)


def resolve_scan_layers(scan_layers: bool | None, runtime: Runtime) -> bool:
    """The recipe's ``scan_layers``, or when null the platform's choice (``Runtime.scan_layers``)."""
    return scan_layers if scan_layers is not None else runtime.scan_layers


def stacked_state(setup: Setup, state):
    """``state`` (or any tree holding params-keyed dicts) in the stacked layout checkpoints and exports use."""
    return param_layout.map_param_trees(param_layout.stack_layers, state) if setup.layerwise else state


def to_global(setup: Setup, batch: dict, rows: Rows | None = None) -> dict:
    """This process's rows -> global arrays on the mesh (rows over ``rows.axes``, default the training batch's);
    numpy without a mesh."""
    if setup.mesh is None:
        return batch
    rows = rows or setup.rows
    return {k: distributed.global_batch(setup.mesh, v, rows.axes, len(v) * rows.count) for k, v in batch.items()}


def micro_batches(setup: Setup, n: int) -> list[dict]:
    return [to_global(setup, setup.loader.next_batch()) for _ in range(n)]


def _count(x) -> int:
    """A count over a whole (possibly multi-host) batch array, the same on every process."""
    return int(jnp.sum(x))


def make_step_fns(setup: Setup, plan: Plan) -> tuple[Callable, Callable, Callable, dict, Callable | None]:
    """(grad_fn, update, add, the fresh state, eval_fn or None without evaluation)."""
    cfg, config = setup.cfg, setup.config
    spec = S.LossSpec(
        top_k=config.text.moe_topk, aux_coeff=cfg.moe_aux_loss_coeff, z_coeff=cfg.moe_z_loss_coeff,
        grad_accum=cfg.gradient_accumulation_steps,
        lora_scale=cfg.lora_alpha / cfg.lora_r if cfg.use_peft else None, lora_dropout=cfg.lora_dropout,
        compute_dtype=jnp.bfloat16 if cfg.bf16 else jnp.float32,
    )
    grad_fn = S.make_grad_fn(S.make_objective(setup.module, spec))
    schedule = S.make_schedule(cfg.lr_scheduler_type, cfg.learning_rate, plan.total, plan.warmup)
    tx = S.make_optimizer(cfg, schedule, setup.trainable)
    masks = S.layer_masks(traverse_util.flatten_dict(setup.trainable), cfg.freeze_llm_layers,
                          config.text.num_hidden_layers)
    update = jax.jit(S.make_update(tx, masks, schedule), donate_argnums=(0,))
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))
    trainable = onto_mesh(setup.trainable, setup.mesh)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    eval_fn = E.make_eval_fn(setup.module, spec) if setup.eval_set is not None else None
    return grad_fn, update, add, onto_mesh(state, setup.mesh), eval_fn


def train_step(setup: Setup, fns, state: dict, batches: list[dict], rng: jax.Array) -> tuple[dict, dict]:
    """One optimizer step over ``len(batches)`` micro-batches; returns the new state and its metrics."""
    grad_fn, update, add = fns
    label_tokens = sum(_count(D.shift_valid(b["labels"])) for b in batches)
    denom = jnp.float32(max(1, label_tokens))
    grads, totals = None, {"ce_sum": 0.0, "label_tokens": 0, "z_loss": 0.0, "aux_loss": 0.0, "objective": 0.0}
    for i, batch in enumerate(batches):
        spare = setup.spare_grads.pop() if setup.spare_grads else jax.tree.map(jnp.zeros_like, state["trainable"])
        (value, m), g = grad_fn(spare, state["trainable"], setup.frozen, batch, jax.random.fold_in(rng, i), denom)
        if grads is None:
            grads = g
        else:
            grads = add(grads, g)
            setup.spare_grads.append(g)  # read by add: free for the next micro-batch's gradients
        for k in ("ce_sum", "label_tokens", "z_loss", "aux_loss"):
            totals[k] += m[k]
        totals["objective"] += value
    state, norm, lr = update(state, grads)
    setup.spare_grads.append(grads)  # read by the update: the next step's gradients are written into these buffers
    n = len(batches)
    cfg = setup.cfg
    z, aux = float(totals["z_loss"]) / n, float(totals["aux_loss"]) / n
    lm = float(totals["ce_sum"]) / float(denom)
    metrics = {"loss": float(totals["objective"]), "lm_loss": lm, "aux_loss": aux, "z_loss": z,
               "weighted_aux": cfg.moe_aux_loss_coeff * aux + cfg.moe_z_loss_coeff * z,
               "learning_rate": float(lr), "grad_norm": float(norm), "label_tokens": label_tokens}
    return state, metrics


def find_resume(cfg: TrainConfig) -> tuple[str, int | None] | None:
    """(checkpoints directory, step or None: the latest) to resume from, None: a fresh start; a path that does not
    exist is a RecipeError (checked before the model is loaded)."""
    return ckpt.resolve_resume(cfg.resume_from_checkpoint, os.path.join(cfg.output_dir, "checkpoints"))


def restore_or_init(setup: Setup, state: dict, resume: tuple[str, int | None] | None = None
                    ) -> tuple[dict, int | None]:
    """The state to start from: ``state`` (fresh), or the checkpoint ``resume`` (``find_resume``) names, checked
    against this run's shapes first. Reads only: nothing is created."""
    cfg = setup.cfg
    if resume is None:
        return state, None
    directory, step = resume
    source = ckpt.open_manager(directory, None, create=False)
    try:
        steps = sorted(source.all_steps())
        if not steps:
            if cfg.resume_from_checkpoint is True:
                return state, None  # nothing saved yet: a fresh start
            raise RecipeError(f"config key 'resume_from_checkpoint': no checkpoint found in {directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise RecipeError(f"config key 'resume_from_checkpoint': no checkpoint of step {step} in {directory} "
                              f"(it has steps {', '.join(map(str, steps))})")
        # a stacked copy of the fresh state, once per resume, gives the checkpoint's shapes and shardings
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                stacked_state(setup, state))
        restored, data_state = ckpt.restore(source, step, abstract)
    finally:
        source.close()
    setup.loader.state = loader_state(data_state, os.path.join(directory, str(step)))
    if setup.layerwise:
        restored = param_layout.map_param_trees(param_layout.unroll_layers, restored)
    return restored, step


def loader_state(data_state, where: str) -> dict[str, int]:
    """The data position saved with a checkpoint: non-negative integers under the loader's keys."""
    keys = ("epoch", "position", "dropped", "samples")
    if not isinstance(data_state, dict) or not all(
            isinstance(data_state.get(k), int) and not isinstance(data_state.get(k), bool) and data_state[k] >= 0
            for k in keys):
        raise RecipeError(f"config key 'resume_from_checkpoint': {where}: the saved data position is damaged "
                          f"(expected non-negative integers {', '.join(keys)})")
    return {k: int(data_state[k]) for k in keys}


def export_final(setup: Setup, state: dict) -> None:
    cfg = setup.cfg
    multi = distributed.spans_processes(setup.mesh)  # then gather sharded arrays (every process), write on one
    trainable, frozen = stacked_state(setup, state["trainable"]), stacked_state(setup, setup.frozen)
    trainable = jax.tree.map(distributed.to_host, trainable) if multi else jax.device_get(trainable)
    frozen = jax.tree.map(distributed.to_host, frozen) if multi else frozen
    if not distributed.is_main_process():
        return

    # written beside output_dir/export and moved in once complete: a failed export (a full disk) leaves nothing
    # half-written, and the previous export until the new one is whole
    with staged_directory(os.path.join(cfg.output_dir, "export"), overwrite=True) as out:
        if cfg.use_peft:
            scale = cfg.lora_alpha / cfg.lora_r
            merged = merge_lora(Q.float_base(frozen, setup.config), trainable, scale, setup.rules)
            export_adapter(trainable, setup.rules, cfg, os.path.join(out, "adapter"))
        else:
            merged = traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                                   **traverse_util.flatten_dict(trainable)})
        export_hf(merged, setup.config, os.path.join(out, "model"), setup.base_dir)


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train as the recipe says; returns the last step's metrics.

    Multi-host (``distributed.initialize()`` first): every process runs this; each builds its own rows of every
    batch, Orbax saves collectively, and only process 0 logs, writes metrics and exports.

    Every setup step (output_dir checked, data and images, model, resumed checkpoint) comes before anything is
    written: a failure leaves a fresh output_dir uncreated. Bad input is a RecipeError; a file-system failure while
    training (a full disk) an OSError naming the file, with the last complete checkpoint still the latest.
    """
    main = distributed.is_main_process()
    if not main:
        log = lambda message: None

    check_output_dir(cfg.output_dir)
    resume = find_resume(cfg)
    setup = build(cfg, log)
    plan = Plan.make(cfg, setup.num_samples, setup.batch)
    if plan.total > MAX_STEPS:
        raise RecipeError(f"config key 'num_train_epochs': {cfg.num_train_epochs:g} epochs of {setup.num_samples} "
                          f"samples are {plan.total} steps, more than {MAX_STEPS}")
    log(plan.describe(setup.mesh, cfg.per_device_train_batch_size))
    grad_fn, update, add, state, eval_fn = make_step_fns(setup, plan)
    state, start = restore_or_init(setup, state, resume)
    if start is not None:
        log(f"resumed from step {start}")
    # the first step's batches, before anything is written: a dataset whose every sample is dropped fails here
    first = micro_batches(setup, cfg.gradient_accumulation_steps) if int(state["step"]) < plan.total else None
    tensorboard, wandb = reporters(cfg.report_to, log)
    if main:  # the run starts: only now is output_dir created and written
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_resolved(cfg, cfg.output_dir)
    wandb_init = {"project": os.environ.get("WANDB_PROJECT", "huggingface"), "name": cfg.run_name,
                  "config": recipe_dict(cfg), "dir": cfg.output_dir}
    with ckpt.quiet_orbax_errors():
        manager = None
        if cfg.save_strategy != "no":
            manager = ckpt.open_manager(os.path.join(cfg.output_dir, "checkpoints"), cfg.save_total_limit)
        metrics_log = None
        try:
            metrics_log = MetricsLog(cfg.output_dir, start, enabled=main, tensorboard=tensorboard,
                                     tb_dir=cfg.logging_dir, wandb=wandb, wandb_init=wandb_init)
            evaluator = None if eval_fn is None else (lambda st: E.evaluate(
                setup.eval_set, eval_fn, st["trainable"], setup.frozen,
                lambda b: to_global(setup, b, setup.eval_set.rows), log))
            state, metrics = train_loop(setup, (grad_fn, update, add), state, plan, manager, metrics_log, first,
                                        evaluator, quiet=getattr(log, "quiet", False))
            if manager is not None:
                ckpt.finish(manager)
        except BaseException:
            if manager is not None:
                ckpt.close_quietly(manager)
            if metrics_log is not None:
                metrics_log.close(quietly=True)  # the error that ended the run is the one reported
            raise
        metrics_log.close()
        if manager is not None:
            manager.close()
    if cfg.export:
        export_final(setup, state)
    return metrics


def train_loop(setup: Setup, fns, state: dict, plan: Plan, manager, metrics_log: MetricsLog,
               first: list[dict] | None = None, evaluator: Callable[[dict], dict | None] | None = None,
               quiet: bool = False) -> tuple[dict, dict]:
    """Steps from ``state["step"]`` to ``plan.total`` (``first``: the first step's batches, already drawn): metrics,
    checkpoints (``manager``; None: none) and evaluations (``evaluator``) at the steps ``plan`` says. Returns the
    state and the last step's metrics (with the last evaluation's)."""
    cfg = setup.cfg
    flat = Q.logical_params(setup.params, setup.config)
    active = S.active_params(flat, setup.config.text.moe_topk, setup.config.text.moe_num_experts)
    base_rng = jax.random.key(cfg.seed)
    step = int(state["step"])
    metrics: dict = {}
    evaluated: dict = {}

    def evaluate() -> None:
        result = evaluator(state)
        if result is not None:
            evaluated.update(result)
            metrics_log.write({"step": step, "epoch": round(step / plan.per_epoch, 4), **result})

    if evaluator is not None and cfg.eval_on_start:
        evaluate()
    hide = not distributed.is_main_process() or (cfg.disable_tqdm if cfg.disable_tqdm is not None else quiet)
    with tqdm(total=plan.total, initial=step, disable=hide, desc="train") as bar:
        while step < plan.total:
            t0 = time.perf_counter()
            batches, first = first or micro_batches(setup, cfg.gradient_accumulation_steps), None
            state, metrics = train_step(setup, fns, state, batches, jax.random.fold_in(base_rng, step))
            step += 1
            dt = time.perf_counter() - t0
            tokens = sum(_count(b["attention_mask"]) for b in batches)
            padded = sum(b["input_ids"].size for b in batches)
            metrics = {"step": step, "epoch": round(setup.loader.epoch_progress, 4), **metrics, "tokens": tokens,
                       "dropped_samples": setup.loader.state["dropped"], "skipped_samples": setup.skipped,
                       "tokens_per_s": tokens / dt, "step_time_s": dt, "tflops": 6.0 * active * padded / dt / 1e12}
            if plan.log_at(step):
                metrics_log.write(metrics)
                bar.set_postfix(loss=f"{metrics['lm_loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
            if evaluator is not None and plan.eval_at(step):
                evaluate()
            if manager is not None and plan.save_at(step):
                ckpt.save(manager, step, stacked_state(setup, state), dict(setup.loader.state))
            bar.update(1)
    return state, {**metrics, **evaluated}
