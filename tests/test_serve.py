"""`anychip serve` with real clients: the openai package, lm-eval's local-completions, raw sockets for faults.

One server process (tiny random model, 4 slots of 256 tokens, 12 waiting places) serves every test of this module; the
last test stops it with SIGTERM. Expected outputs come from anychip's own one-shot decoder and forward
pass in this process, so the server's engine (slot-batched KV cache, per-row sampling) is checked against
independent code paths.
"""

import functools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from anychip.interop.engine import _decode_step, _rows, _sampling_arrays
from anychip.model.decoder import forward, init_cache
from anychip.model.generate import generate, generate_text
from anychip.train.run_dir import RunDir, load_run

MODEL = "tiny-chat"
USER = [{"role": "user", "content": "the lazy dog?"}]
# Server (KV-cache prefill) and reference (full forward) differ only in fp32 summation order: |Δlogit| ≤ 1e-4
# (test_generate), so a log-probability moves by at most 2e-4 (the logit and the log-sum-exp each).
LOGPROB_ATOL = 2e-4


class Server:
    def __init__(self, run_dir):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anychip.cli", "serve", str(run_dir), "--port", "0", "--slots", "4",
             "--max-queue", "12"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines, ready = [], threading.Event()

        def drain():  # keep reading, so the server never blocks on a full pipe
            for line in self.proc.stdout:
                self.lines.append(line)
                ready.set() if "ready on" in line else None
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(timeout=300)
        found = re.search(r"ready on (http://[\d.]+:(\d+)/v1)", "".join(self.lines))
        assert found, "".join(self.lines)
        self.url, self.port = found.group(1), int(found.group(2))

    def get(self, path):
        with urllib.request.urlopen(self.url.removesuffix("/v1") + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, body):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_for(self, condition, timeout=60):
        deadline = time.time() + timeout
        while not condition(self.get("/health")):
            assert time.time() < deadline, self.get("/health")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def server(chat_run):
    s = Server(chat_run)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


@pytest.fixture(scope="module")
def model(chat_run):
    cfg, params, tokenizer = load_run(chat_run)
    return cfg.model, params, RunDir(chat_run).prompt_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(cfg, params, tokens):
    return jax.nn.log_softmax(forward(params, tokens, cfg, compute_dtype=jnp.float32), axis=-1)


def logprobs(model, ids):
    """(len(ids), V) next-token log-probabilities from the full forward pass, padded to one compiled length
    (causal: the padding changes nothing before it)."""
    cfg, params, _ = model
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(_log_softmax(cfg, params, tokens)[0, :len(ids)])


def greedy(model, prompt_ids, n, stop=True):
    cfg, params, prompts = model
    return generate(params, cfg, [prompt_ids], max_new_tokens=n, temperature=0,
                    stop_tokens=prompts.stop_ids if stop else ())[0]


def test_completion_and_chat_with_the_openai_client_equal_anychips_own_decoding(client, model):
    cfg, params, prompts = model
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=10, temperature=0)
    ids = greedy(model, prompts.encode("the quick brown"), 10)
    assert out.choices[0].text == prompts.decode(ids)
    assert out.choices[0].finish_reason == ("length" if len(ids) == 10 else "stop")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompts.encode("the quick brown")), len(ids))

    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == generate_text(params, cfg, prompts, USER[0]["content"], chat=True,
                                                            max_new_tokens=10, temperature=0)
    assert chat.usage.prompt_tokens == len(prompts.encode_chat(USER))

    sampled = [client.completions.create(model=MODEL, prompt="the", max_tokens=12, seed=seed, temperature=1,
                                         extra_body={"top_k": 50, "ignore_eos": True}).choices[0].text
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed fixes the sample


def test_streaming_sends_the_same_text_and_stops_at_stop_strings(client):
    kwargs = {"model": MODEL, "prompt": "the quick brown", "max_tokens": 16, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices

    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut = whole[:whole.find(stop)]
    assert client.completions.create(**kwargs, stop=[stop]).choices[0].text == cut
    streamed = list(client.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"

    chat = {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0}
    reply = client.chat.completions.create(**chat).choices[0].message.content
    deltas = list(client.chat.completions.create(**chat, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == reply


def test_16_concurrent_requests_share_decode_steps(client, server, model):
    _, _, prompts = model
    texts = [f"the lazy dog {i} jumps" for i in range(16)]
    expected = [prompts.decode(greedy(model, prompts.encode(t), 12, stop=False)) for t in texts]
    steps = server.get("/health")["steps"]

    def ask(text):
        return client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(ask, texts)) == expected
    # One at a time would take 16 × 11 decode steps (each request's first token comes from its prefill);
    # 4 slots shared bring it to about a quarter. Half is a bound that admission gaps cannot reach.
    assert server.get("/health")["steps"] - steps <= 16 * 11 // 2


def test_a_decode_step_computes_only_the_occupied_slots(model):
    """One request alone must not pay for a full batch of slots: a step covers the slots up to the last
    occupied one (rounded up to a power of two), and its compiled program does that many rows' work."""
    assert [_rows(r) for r in ([1, None, None, None], [None, 1, None, None], [1, None, 1, None],
                               [None] * 5 + [1])] == [1, 2, 4, 6]
    cfg, params, _ = model
    cache = init_cache(cfg, 4, 64, jnp.float32)
    flops = {}
    for rows in (1, 4):
        idle = np.zeros(rows, np.int32)
        compiled = _decode_step.lower(params, cache, idle, idle, _sampling_arrays([None] * rows, [0] * rows), cfg=cfg,
                                      compute_dtype=jnp.float32, length=64, top_k_cap=0, use_top_p=False).compile()
        flops[rows] = compiled.cost_analysis()["flops"]
    # Every op but the any() over the rows' temperatures is per-row work, so 4 rows cost 4x one row; a step
    # of all 4 slots regardless of occupancy gives 1.0x, a partly shared step well under 3.6x.
    assert 3.6 <= flops[4] / flops[1] <= 4.05, flops


def test_echo_with_logprobs_scores_the_prompt_like_the_forward_pass(client, model):
    _, _, prompts = model
    ids = prompts.encode("the quick brown fox jumps over")
    logp = logprobs(model, ids)
    for prompt in ("the quick brown fox jumps over", ids):
        for max_tokens in (0, 1):  # 1: lm-eval's form, one generated token after the echoed prompt
            lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True,
                                           logprobs=2, temperature=0).choices[0].logprobs
            assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None
            np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], logp[np.arange(len(ids) - 1), ids[1:]],
                                       atol=LOGPROB_ATOL)
            assert lp.tokens[:len(ids)] == [prompts.token_text(i) for i in ids]
            for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
                assert 1 <= len(top) <= 2 and max(top.values()) >= chosen - LOGPROB_ATOL


def test_bad_requests_get_openai_style_errors(client, server):
    cases = [({"prompt": [5] * 260}, "maximum context length is 256"),
             ({"prompt": "the", "max_tokens": 256}, "maximum context length"),
             ({"prompt": "the", "temperature": 3}, "temperature"),
             ({"prompt": "the", "logprobs": 21}, "logprobs"),
             ({"prompt": [600]}, "token ids"),
             ({"prompt": "the", "n": 2}, "n=1")]
    for body, message in cases:
        status, error = server.post("/completions", {"model": MODEL, **body})
        assert status == 400 and error["error"]["type"] == "invalid_request_error", (body, error)
        assert message in error["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="the")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    request = urllib.request.Request(server.url + "/completions", b"{not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_lm_eval_local_completions_scores_equal_anychips_loglikelihoods(server, model, lm_eval_tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, _, prompts = model
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["toy_mc"], log_samples=True,
        task_manager=TaskManager(include_path=str(lm_eval_tasks), include_defaults=False),
        model_args={"base_url": server.url + "/completions", "model": MODEL, "num_concurrent": 4,
                    "max_retries": 1, "max_length": 256})

    docs = [json.loads(line) for line in (lm_eval_tasks / "toy.jsonl").read_text().splitlines()]
    correct = 0
    for sample in sorted(results["samples"]["toy_mc"], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        ours = []
        for choice, (served, _) in zip(doc["choices"], (r[0] for r in sample["resps"])):
            context, whole = prompts.encode(doc["question"], False), prompts.encode(f"{doc['question']} {choice}", False)
            logp = logprobs(model, whole)
            ours.append(float(sum(logp[j - 1, whole[j]] for j in range(len(context), len(whole)))))
            assert served == pytest.approx(ours[-1], abs=LOGPROB_ATOL * (len(whole) - len(context)))
        correct += int(np.argmax(ours) == doc["answer"])
    assert results["results"]["toy_mc"]["acc,none"] == pytest.approx(correct / len(docs))


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_anychip_eval_tasks_runs_lm_eval_in_process_on_anychips_own_scores(chat_run, model, lm_eval_tasks, capsys):
    from anychip.cli import main
    from anychip.interop.harness import evaluate_tasks

    _, _, prompts = model
    docs = [json.loads(line) for line in (lm_eval_tasks / "toy.jsonl").read_text().splitlines()]
    tasks = [str(lm_eval_tasks / f"{name}.yaml") for name in ("toy_mc", "toy_gen", "toy_ppl")]
    samples = evaluate_tasks(chat_run, tasks, batch_size=4, log_samples=True)["samples"]
    for sample in samples["toy_mc"]:  # log p(" choice" | question), the continuation's tokens only
        doc = docs[sample["doc_id"]]
        context = prompts.encode(doc["question"], False)
        for choice, ((ll, _),) in zip(doc["choices"], sample["resps"]):
            whole = prompts.encode(f"{doc['question']} {choice}", False)
            logp = logprobs(model, whole)
            assert ll == pytest.approx(sum(logp[j - 1, whole[j]] for j in range(len(context), len(whole))), abs=1e-4)
    for sample in samples["toy_gen"]:  # greedy, at most 6 tokens, cut before the first "o"
        text = prompts.decode(greedy(model, prompts.encode(docs[sample["doc_id"]]["question"], False), 6))
        assert sample["resps"][0][0] == text.split("o")[0]
    for sample in samples["toy_ppl"]:  # the whole text after the prefix token (end of text)
        ids = [prompts.first_token(), *prompts.encode(docs[sample["doc_id"]]["question"], False)]
        logp = logprobs(model, ids)
        assert sample["resps"][0][0] == pytest.approx(sum(logp[j - 1, ids[j]] for j in range(1, len(ids))), abs=1e-4)

    out = lm_eval_tasks / "results.json"
    assert main(["eval", str(chat_run), "--tasks", tasks[0], "--output", str(out)]) == 0
    assert "toy_mc" in capsys.readouterr().out and json.loads(out.read_text())["results"]["toy_mc"]["acc,none"] >= 0


def _send(port, body):
    """A completion request on a raw socket whose answer is never read."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_a_full_queue_answers_429_and_clients_that_leave_free_their_slots(server):
    long = {"model": MODEL, "prompt": "the", "max_tokens": 250, "ignore_eos": True}
    before = server.get("/health")["cancelled"]
    socks = [_send(server.port, long) for _ in range(16)]  # 4 slots + 12 waiting places
    server.wait_for(lambda h: h["running"] + h["waiting"] == 16)
    status, error = server.post("/completions", long)
    assert status == 429 and error["error"]["type"] == "rate_limit_error", error
    for sock in socks:
        sock.close()
    # 16 requests of 250 tokens are ~1,000 decode steps; gone clients stop theirs at the next one.
    server.wait_for(lambda h: h["running"] == 0 and h["waiting"] == 0)
    assert server.get("/health")["cancelled"] - before == 16


def test_sigterm_lets_requests_in_flight_finish_then_exits(server, client):
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=client.completions.create(
        model=MODEL, prompt="the", max_tokens=250, temperature=0, extra_body={"ignore_eos": True})))
    thread.start()
    server.wait_for(lambda h: h["running"] == 1)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert result["out"].usage.completion_tokens == 250 and result["out"].choices[0].finish_reason == "length"
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained for
    assert "anychip serve: stopped" in "".join(server.lines)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
