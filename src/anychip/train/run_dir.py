"""A run directory: every file a run keeps, and the one place that names them.

    config.yaml          the resolved config (itself a valid config file)
    tokenizer.json       the tokenizer the run trains with
    special_tokens.json  its bos/eos/pad tokens and chat template (data/chat.py; written once, yours to edit)
    data_manifest.json   the manifest of the data it trains on
    metrics.jsonl        one JSON object per logged step, evaluation or event
    checkpoints/         numbered checkpoints (train/checkpoint.py); checkpoints.<reason>/: set aside
    report.png           `anychip report`
    tensorboard/         event files, with log.tensorboard=true

Only process 0 writes the run's own files; orbax coordinates the checkpoints' writes itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from anychip.config import CheckpointConfig, Config, load_config, replace, save_config
from anychip.data.chat import PromptTokenizer, SpecialTokens
from anychip.data.tokenizer import load_tokenizer
from anychip.errors import UserError
from anychip.files import read_text, write_text_atomic
from anychip.train.checkpoint import Checkpointer
from anychip.train.step import abstract_state, build_trainer


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    special_tokens = property(lambda self: self.path / "special_tokens.json")
    data_manifest = property(lambda self: self.path / "data_manifest.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    report = property(lambda self: self.path / "report.png")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def __str__(self) -> str:
        return str(self.path)

    # -- the run's own files ----------------------------------------------------------------

    def write_files(self, cfg: Config, tokenizer_json: str, data_manifest_json: str | None = None,
                    special_tokens: SpecialTokens | None = None) -> None:
        """config.yaml, tokenizer.json, (when training on prepared data) data_manifest.json and (when
        given) special_tokens.json."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config)
        write_text_atomic(self.tokenizer, tokenizer_json)
        if data_manifest_json is not None:
            write_text_atomic(self.data_manifest, data_manifest_json)
        if special_tokens is not None:
            write_text_atomic(self.special_tokens, special_tokens.to_json())

    def read_special_tokens(self, tokenizer: Tokenizer) -> SpecialTokens:
        """special_tokens.json, checked against `tokenizer`; without one, the defaults of an anychip tokenizer."""
        if not self.special_tokens.is_file():
            return SpecialTokens.defaults(tokenizer)
        return SpecialTokens.from_json(read_text(self.special_tokens), tokenizer, str(self.special_tokens))

    def prompt_tokenizer(self, tokenizer: Tokenizer) -> PromptTokenizer:
        """`tokenizer` with this run's special tokens and chat template, for prompts (generate, serve, lm-eval)."""
        return PromptTokenizer(tokenizer, self.read_special_tokens(tokenizer))

    def read_config(self) -> Config:
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a run directory (no config.yaml)")
        return load_config(self.config)

    def checkpointer(self, c: CheckpointConfig | None = None, log: Callable[[str], None] = print) -> Checkpointer:
        """The run's checkpoints; without a checkpoint config, synchronous saves (imports, readers)."""
        if c is None:
            return Checkpointer(self.checkpoints, async_save=False, log=log)
        return Checkpointer.from_config(self.checkpoints, c, log)

    # -- metrics.jsonl ----------------------------------------------------------------------

    def metrics_bytes(self) -> int:
        return self.metrics.stat().st_size if self.metrics.is_file() else 0

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every row of metrics.jsonl; a last line cut short by a crash is left out."""
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a row half-written when the process died: the resumed run writes it again
        return [r for r in rows if isinstance(r, dict)]

    def truncate_metrics(self, keep: int | None, log: Callable[[str], None]) -> None:
        """Cut metrics.jsonl back to `keep` bytes, its length when the restored checkpoint was written (0:
        starting fresh): rows a killed run wrote after its last checkpoint are written again, identically."""
        if keep is None or not self.metrics.is_file():
            return
        size = self.metrics.stat().st_size
        if size < keep:
            log(f"warning: {self.metrics} is shorter than when its checkpoint was written; left as is")
        elif size > keep:
            os.truncate(self.metrics, keep)

    def copy_metrics(self, folder: Path) -> Path | None:
        """A timestamped copy of metrics.jsonl in `folder` (before a rewind cuts it)."""
        if not self.metrics.is_file():
            return None
        dest = folder / f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        shutil.copyfile(self.metrics, dest)
        return dest

    # -- the trained model ------------------------------------------------------------------

    def load_tokenizer(self, ckpt: Checkpointer, step: int) -> Tokenizer:
        """tokenizer.json, else the copy inside checkpoint `step` (a checkpoint copied on its own)."""
        if self.tokenizer.is_file() or (stored := ckpt.read_tokenizer(step)) is None:
            return load_tokenizer(self.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.json").write_text(json.dumps(stored), encoding="utf-8")
            return load_tokenizer(Path(tmp) / "tokenizer.json")


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[Config, Any, Tokenizer]:
    """(config, params on this process's devices, tokenizer) of a run directory's newest checkpoint (or
    checkpoint `step`). Eval, generation, serving and export need no particular layout, so the saved mesh
    is replaced by all local devices on fsdp."""
    run = RunDir(run_dir)
    cfg = replace(run.read_config(), mesh={"data": 1, "fsdp": -1, "tensor": 1})
    ckpt = run.checkpointer()
    try:
        if not ckpt.all_steps():
            raise UserError(f"{run_dir} has no checkpoint")
        abstract = abstract_state(build_trainer(cfg))
        if step is None:  # the newest that restores intact (a damaged one is moved aside with a warning)
            step, state, _ = ckpt.restore_newest(abstract)  # type: ignore[misc]
        else:
            state, _ = ckpt.restore(step, abstract)
        tokenizer = run.load_tokenizer(ckpt, step)
    finally:
        ckpt.close()
    return cfg, state.params, tokenizer
