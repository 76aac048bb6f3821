"""Where a run starts: the checkpoint `checkpoint.resume` asks for, else `init_from`'s parameters, else a
fresh initialisation; and the checks that the data and tokenizer still match what was trained on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from anychip.config import Config, to_dict
from anychip.data.chat import SpecialTokens
from anychip.data.dataset import TokenDataset
from anychip.data.mixture import MixtureDataset
from anychip.data.tokenizer import load_tokenizer, tokenizer_hash
from anychip.errors import UserError
from anychip.model.params import param_shapes
from anychip.parallel.distributed import is_main_process
from anychip.train.checkpoint import Checkpointer
from anychip.train.run_dir import RunDir, load_run
from anychip.train.step import Trainer, TrainState, abstract_state


def resume_step(cfg: Config, ckpt: Checkpointer) -> int | None:
    """The checkpoint `checkpoint.resume` asks for (None: start fresh), decided before run_dir changes."""
    steps, mode = ckpt.all_steps(), cfg.checkpoint.resume
    if mode == "never" and steps:
        raise UserError(f"{ckpt.directory} already holds checkpoints (steps {steps[0]}..{steps[-1]}) and "
                        "checkpoint.resume=never; choose a new run_dir (nothing was changed)")
    if mode in ("auto", "never"):
        return steps[-1] if steps and mode == "auto" else None
    if int(mode) not in steps:
        raise UserError(f"checkpoint.resume={mode}: {ckpt.directory} has no checkpoint {mode} "
                        f"(it has {steps})")
    return int(mode)


def resume(trainer: Trainer, run: RunDir, ckpt: Checkpointer, step: int,
           log: Callable[[str], None]) -> tuple[TrainState, dict[str, Any]]:
    """Restore checkpoint `step`: with resume=auto the newest that restores intact, else exactly `step`,
    moving newer checkpoints to checkpoints.rewound/ (the steps ahead will be saved again)."""
    if trainer.cfg.checkpoint.resume == "auto":
        found = ckpt.restore_newest(abstract_state(trainer), max_step=step)
        if found is None:  # all vanished since resume_step listed them
            raise UserError(f"the checkpoints in {ckpt.directory} disappeared while resuming")
        step, state, meta = found
    else:
        state, meta = ckpt.restore(step, abstract_state(trainer))
        newer = [s for s in ckpt.all_steps() if s > step]
        if newer:
            where = ckpt.set_aside(newer, "rewound")
            if is_main_process():
                run.copy_metrics(where)
            log(f"rewinding to step {step}: moved checkpoints {newer} and a copy of metrics.jsonl to {where}")
    changed = config_changes(meta.get("config", {}), to_dict(trainer.cfg))
    log(f"resumed from {ckpt.directory}/{step}" + (f" with changed settings: {changed}" if changed else ""))
    return state, meta


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """'train.steps 100 -> 200, ...' for the settings that differ (checkpoint.resume aside)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.append(config_changes(a, b, f"{prefix}{key}."))
        elif a != b and f"{prefix}{key}" != "checkpoint.resume":
            changes.append(f"{prefix}{key} {a} -> {b}")
    return ", ".join(c for c in changes if c)


def check_same_data(meta: dict[str, Any], data_dir: str | Path, train_ds: TokenDataset | MixtureDataset,
                    log: Callable[[str], None]) -> dict[str, Any] | None:
    """A resumed run must read the same tokens: a new tokenizer is an error, new data a warning. New
    mixture weights are allowed with a warning; the returned `mixture_changed` event (old and new weights)
    is for metrics.jsonl."""
    step = meta.get("step")
    if meta.get("tokenizer_sha256") not in (None, train_ds.manifest["tokenizer_sha256"]):
        raise UserError(f"{data_dir} was tokenized with another tokenizer than checkpoint {step} "
                        "of this run_dir was trained with; use the run's data or start a new run_dir")
    old_mix, new_mix = meta.get("data_mixture"), train_ds.manifest.get("mixture")
    if old_mix is None or new_mix is None:
        if meta.get("data_manifest_sha256") not in (None, train_ds.manifest_sha256):
            log(f"warning: {data_dir} is not the data checkpoint {step} was trained on (manifest "
                "differs): training goes on, but the data order does not continue exactly")
        return None
    old_data = {e["path"]: e["manifest_sha256"] for e in old_mix}
    if any(old_data[e["path"]] != e["manifest_sha256"] for e in new_mix if e["path"] in old_data):
        log(f"warning: a component of data.mixture is not the data checkpoint {step} was trained on "
            "(its manifest differs): training goes on, but the data order does not continue exactly")
    old, new = ({e["path"]: e["weight"] for e in mix} for mix in (old_mix, new_mix))
    if old == new:
        return None
    log(f"warning: data.mixture changed since checkpoint {step}: {_weights(old)} -> {_weights(new)}; "
        f"the batches from step {step} on follow the new weights (recorded in metrics.jsonl)")
    return {"step": step, "event": "mixture_changed", "old": old, "new": new}


def _weights(weights: dict[str, float]) -> str:
    return ", ".join(f"{path} {w:.3g}" for path, w in weights.items())


def check_init_tokenizer(cfg: Config, train_ds: TokenDataset) -> None:
    """`init_from` weights only make sense on data tokenized with the tokenizer they were trained with."""
    if not cfg.init_from:
        return
    path = Path(cfg.init_from) / "tokenizer.json"
    if path.is_file() and tokenizer_hash(load_tokenizer(path)) != train_ds.manifest["tokenizer_sha256"]:
        raise UserError(f"{train_ds.data_dir} was tokenized with another tokenizer than init_from={cfg.init_from}; "
                        f"prepare it with: anychip data prepare ... --tokenizer {path}")


def new_special_tokens(cfg: Config, run: RunDir, train_ds: TokenDataset) -> SpecialTokens | None:
    """What a run's special_tokens.json starts as: init_from's (same tokenizer, checked above: an imported chat
    model keeps its eos and template), else the tokenizer's defaults. None once the run has one: it is the
    user's to edit, and resuming must not undo that."""
    if run.special_tokens.is_file():
        return None
    tokenizer = load_tokenizer(train_ds.tokenizer_path)
    return RunDir(cfg.init_from).read_special_tokens(tokenizer) if cfg.init_from else SpecialTokens.defaults(tokenizer)


def start_state(trainer: Trainer, run: RunDir, ckpt: Checkpointer,
                log: Callable[[str], None]) -> tuple[TrainState, dict[str, Any] | None]:
    """(state, its checkpoint's meta): resumed as `checkpoint.resume` says, else from `init_from` params,
    else initialised (meta None)."""
    cfg = trainer.cfg
    step = resume_step(cfg, ckpt)
    if step is not None:
        return resume(trainer, run, ckpt, step, log)
    state = trainer.init(jax.random.key(cfg.train.seed))
    if cfg.init_from:
        # Orbax restores whole trees only, and the source's optimizer-state layout follows the source's
        # own config (e.g. grad_clip adds a chain): load_run restores with that, then keep the params.
        source_cfg, params, _ = load_run(cfg.init_from)
        if param_shapes(source_cfg.model) != param_shapes(cfg.model):
            raise UserError(f"init_from={cfg.init_from}: its model ({source_cfg.model.name}) has other "
                            f"parameter shapes than this run's model ({cfg.model.name})")
        params = jax.tree.map(lambda p, own: p.astype(own.dtype), params, state.params)
        state = state._replace(params=jax.device_put(params, trainer.state_shardings.params))
        o = cfg.optim
        log(f"initialised parameters from {cfg.init_from}; optimizer state is fresh: peak lr {o.lr:g} after "
            f"{o.warmup_steps} warmup steps, {o.schedule} to {o.lr * o.min_lr_ratio:g}, weight decay {o.weight_decay:g}")
    return state, None
