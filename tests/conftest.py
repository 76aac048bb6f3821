import os

import jax
import pytest

# `compute.dtype=auto` on CPU is bf16 where the CPU has bf16 dot instructions and fp32 elsewhere
# (jaxenv.cpu_has_bf16): the suite pins fp32 so that its numbers are the same on every CI machine.
# Subprocesses the tests start inherit it.
os.environ["ANYCHIP_CPU_BF16"] = "0"

# fp32 matmuls on CPU really are fp32 (XLA CPU may otherwise pick faster, lower-precision paths).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def key():
    return jax.random.key(0)


STDLIB_SAMPLE = ("json", "email", "textwrap.py", "argparse.py", "dataclasses.py", "string.py")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A prepared data dir (vocab 512) from a few standard-library modules: real code, ~0.7 MB, offline."""
    import shutil
    import sysconfig
    from pathlib import Path

    from anychip.data.prepare import prepare

    root = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path_factory.mktemp("corpus_src")
    for name in STDLIB_SAMPLE:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "tests"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("corpus") / "data"
    prepare([str(src)], out, vocab_size=512, val_fraction=0.1, log=lambda _: None)
    return out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """A tiny random run (no training: serving and scoring need none) with ChatML control tokens, a chat
    template, and <|im_end|> then <|endoftext|> as its end-of-sequence tokens. init_std 0.3 spreads the
    logits, so greedy decoding has no near-ties and varies from token to token."""
    from tokenizers import AddedToken

    from anychip.config import Config, replace
    from anychip.data.chat import SpecialTokens
    from anychip.data.tokenizer import EOT, train_tokenizer
    from anychip.interop.hf import write_run
    from anychip.model.params import init_params

    tok = train_tokenizer([f"the quick brown fox jumps over the lazy dog {i}. " * 3 for i in range(300)], 400)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    run_dir = tmp_path_factory.mktemp("chat_run") / "tiny-chat"
    model = {"preset": "tiny", "vocab_size": 512, "init_std": 0.3}
    cfg = replace(Config(), model=model, run_dir=str(run_dir))
    write_run(cfg, init_params(cfg.model, jax.random.key(0)), tok, "test",
              SpecialTokens(EOT, ("<|im_end|>", EOT), EOT, CHATML))
    return run_dir


TOY_MC = [{"question": f"the quick brown fox jumps over the {w}", "choices": ["dog", "cat", "fox", "lazy dog"],
           "answer": i % 4} for i, w in enumerate(["lazy", "quick", "brown", "old", "red", "big"])]
TASKS = {
    "toy_mc": "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: answer\n"
              "metric_list:\n  - metric: acc\n",
    "toy_gen": "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: \"{{choices[answer]}}\"\n"
               "generation_kwargs:\n  until: [\"o\"]\n  max_gen_toks: 6\n"
               "metric_list:\n  - metric: exact_match\n",
    "toy_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: question\ndoc_to_target: question\n"
               "metric_list:\n  - metric: word_perplexity\n",
}


@pytest.fixture(scope="session")
def lm_eval_tasks(tmp_path_factory):
    """lm-eval task files (multiple choice, generation, rolling log-likelihood) over local JSON lines, and an
    environment in which lm-eval and datasets stay offline and cache under tmp."""
    import json

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TOY_MC))
    for name, spec in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {folder / 'toy.jsonl'}\ntest_split: test\n{spec}")
    with pytest.MonkeyPatch.context() as env:
        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.setenv(key, "1")
        env.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield folder
