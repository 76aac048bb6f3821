"""lm-evaluation-harness on a run, in-process: an lm-eval `LM` over anychip's scorer and generator.

`anychip eval RUN_DIR --tasks NAME_OR_YAML ...`. A name is one of lm-eval's tasks (hellaswag, arc_easy, ...,
whose data sets come from the Hugging Face Hub: the network once, or HF_DATASETS_OFFLINE=1 with a warm
cache); a YAML file is a task of your own (lm-eval's task format; its folder is searched for the tasks it
includes), which runs offline on local data files.

Log-likelihoods are the scorer of `anychip eval` (train/evaluate.py: one forward pass per batch of
right-padded sequences, fp32 log-softmax), generation is `model.generate` (greedy unless a task asks
otherwise), and both see prompts through the run's `PromptTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from anychip.config import replace
from anychip.data.chat import stop_index
from anychip.errors import UserError, require
from anychip.files import write_text_atomic
from anychip.model.generate import _bucket, generate
from anychip.train.evaluate import token_scorer
from anychip.train.run_dir import RunDir, load_run
from anychip.train.step import build_trainer


class AnychipLM(TemplateLM):
    """A run as lm-eval sees a model: token-level log-likelihoods, rolling log-likelihoods, generation."""

    def __init__(self, run_dir: str | Path, batch_size: int = 8, dtype: str = "float32"):
        super().__init__()
        cfg, self.params, tokenizer = load_run(run_dir)
        self.cfg = replace(cfg, train={"batch_size": batch_size, "grad_accum": 1, "seq_len": cfg.model.max_seq_len},
                           compute={"dtype": dtype})
        self.prompts = RunDir(run_dir).prompt_tokenizer(tokenizer)
        self.score = token_scorer(build_trainer(self.cfg))
        self.rows, self.max_length, self.name = batch_size, cfg.model.max_seq_len, Path(run_dir).name

    @property
    def eot_token_id(self) -> int:
        return (self.prompts.stop_ids or (self.prompts.first_token(),))[0]

    @property
    def prefix_token_id(self) -> int:
        return self.prompts.first_token()  # the context of an empty context, and of a rolling window's start

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.prompts.encode(string, add_special_tokens=bool(add_special_tokens))

    def _score_batch(self, rows: list[list[int]], n_scored: list[int]) -> list[tuple[float, bool]]:
        """Sum of the log-probabilities of each row's last n tokens, and whether each was the argmax."""
        length = min(_bucket(max(map(len, rows))), self.max_length + 1)
        tokens = np.zeros((self.rows, length), np.int32)  # right padding, never attended to
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
        logprobs, greedy = (np.asarray(x) for x in self.score(self.params, tokens))  # (B, length - 1)
        out = []
        for i, (row, n) in enumerate(zip(rows, n_scored)):
            span = slice(len(row) - 1 - n, len(row) - 1)  # the targets of the row's last n tokens
            out.append((float(logprobs[i, span].sum()), bool(greedy[i, span].all())))
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """(key, context ids, continuation ids) → (log p(continuation | context), greedy?); the context is
        cut from the left to fit max_seq_len, as lm-eval's own models do."""
        rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
        results: list[Any] = [None] * len(rows)
        for start in range(0, len(order), self.rows):
            batch = order[start:start + self.rows]
            scores = self._score_batch([rows[i] for i in batch], [len(requests[i][2]) for i in batch])
            for i, score in zip(batch, scores):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks) in disjoint windows of max_seq_len tokens."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each context continued (greedy unless the task sets a temperature) up to max_gen_toks tokens, cut
        before the first of the task's `until` strings."""
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            new = generate(self.params, self.cfg.model, [ids], max_new_tokens=max_new, temperature=temperature,
                           stop_tokens=self.prompts.stop_ids)[0]
            text = self.prompts.decode(new)
            out.append(text[:stop_index(text, until)])
            self.cache_hook.add_partial("generate_until", (context, kwargs), out[-1])
        return out


class _IgnoreTags(yaml.SafeLoader):
    """lm-eval task files may name Python functions (!function utils.process): read them as text only."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to search): a .yaml/.yml argument is a task file, anything else a task name."""
    names, folders = [], []
    for task in tasks:
        if not task.endswith((".yaml", ".yml")):
            names.append(task)
            continue
        path = Path(task)
        require(path.is_file(), f"task file not found: {task}")
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_IgnoreTags)  # a SafeLoader: data only
        require(isinstance(spec, dict) and isinstance(spec.get("task"), str), f"{task}: no 'task: NAME' in it")
        names.append(spec["task"])
        folders.append(str(path.resolve().parent))
    return names, list(dict.fromkeys(folders))


def evaluate_tasks(run_dir: str | Path, tasks: list[str], *, batch_size: int = 8, dtype: str = "float32",
                   limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` of a run on `tasks` (names or YAML files); returns its results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    names, folders = resolve_tasks(tasks)
    manager = TaskManager(include_path=folders or None, include_defaults=len(folders) < len(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    require(not unknown, f"lm-eval has no task {', '.join(unknown)}")
    results = lm_eval.simple_evaluate(model=AnychipLM(run_dir, batch_size, dtype), tasks=names, task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, log_samples=log_samples)
    if results is None:
        raise UserError("lm-eval returned no results")
    return results


def run_tasks(run_dir: str | Path, tasks: list[str], *, output: str | None = None, **kwargs: Any) -> str:
    """`anychip eval RUN --tasks ...`: lm-eval's table of the results; with `output`, also the results and
    per-sample logs as JSON."""
    from lm_eval.utils import handle_non_serializable, make_table

    results = evaluate_tasks(run_dir, tasks, log_samples=output is not None, **kwargs)
    if output:
        write_text_atomic(output, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return make_table(results) + (f"\nwrote {output}" if output else "")
