#!/usr/bin/env python3
"""The official `openai` Python client against a running `moeshard serve`.

Started by coordinator/tests/it/server.rs (server_openai_python_client_with_two_nodes),
which runs the server with SmolLM2 and 2 expert nodes and sets:
  MOESHARD_URL      the server's address, e.g. http://127.0.0.1:8080
  MOESHARD_API_KEY  the key the server was started with
  MOESHARD_MODEL    the model name the server reports
By hand: `moeshard serve -m models/SmolLM2-135M-Instruct.Q4_1.gguf --nodes 2 --api-key k`,
then `MOESHARD_URL=http://127.0.0.1:8080 MOESHARD_API_KEY=k \
MOESHARD_MODEL=SmolLM2-135M-Instruct.Q4_1 python3 tests/openai_client/test_openai.py`.
"""

import os
import sys
import urllib.request

import openai

URL = os.environ["MOESHARD_URL"].rstrip("/")
KEY = os.environ.get("MOESHARD_API_KEY", "none")
MODEL = os.environ["MOESHARD_MODEL"]

client = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


# /v1/models
ids = [m.id for m in client.models.list().data]
check(ids == [MODEL], f"models.list() lists {MODEL} ({ids})")

# Completions, not streamed and streamed (greedy: the same text).
prompt = "The capital of France is"
c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
text = c.choices[0].text
check(c.object == "text_completion" and len(text) > 0, f"completion: {text!r}")
check(c.choices[0].finish_reason in ("stop", "length"), "completion finish_reason")
check(
    c.usage.prompt_tokens > 0
    and 0 < c.usage.completion_tokens <= 12
    and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens,
    f"completion usage {c.usage}",
)
pieces = []
finish = None
usage = None
for chunk in client.completions.create(
    model=MODEL,
    prompt=prompt,
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        usage = chunk.usage
check("".join(pieces) == text, "streamed completion equals the non-streamed one")
check(finish == c.choices[0].finish_reason, "streamed completion finish_reason")
check(usage is not None and usage.completion_tokens == c.usage.completion_tokens, "streamed completion usage")

# Chat, not streamed and streamed.
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
answer = r.choices[0].message.content
check(r.object == "chat.completion" and r.choices[0].message.role == "assistant", "chat response")
check(len(answer) > 0, f"chat answer: {answer!r}")
check(r.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"chat usage {r.usage}")

stream = client.chat.completions.create(
    model=MODEL,
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
roles, pieces, finish, usage = [], [], None, None
for chunk in stream:
    if chunk.choices:
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        usage = chunk.usage
check(roles[:1] == ["assistant"], "the first chat chunk carries the role")
check("".join(pieces) == answer, "streamed chat equals the non-streamed answer")
check(finish == r.choices[0].finish_reason, "streamed chat finish_reason")
check(usage is not None and usage.prompt_tokens == r.usage.prompt_tokens, "streamed chat usage")

# Stop strings never show up in the answer.
if len(text.split()) >= 3:
    stop = text.split()[1]
    s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    check(stop not in s.choices[0].text and s.choices[0].finish_reason == "stop", f"stop {stop!r}: {s.choices[0].text!r}")

# Seeded sampling is reproducible.
a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.9, seed=7)
b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.9, seed=7)
check(a.choices[0].text == b.choices[0].text, "same seed, same sampled text")

# Errors come back as the client's exceptions.
try:
    client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    check(False, "empty messages refused")
except openai.BadRequestError as e:
    check(e.status_code == 400, f"empty messages: 400 ({e.message})")
try:
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=10**6)
    check(False, "context overflow refused")
except openai.BadRequestError as e:
    check(e.code == "context_length_exceeded", f"context overflow: {e.code}")
bad = openai.OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0)
try:
    bad.models.list()
    check(False, "wrong key refused")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "wrong API key: 401")

# /health and /metrics (parsed with Prometheus' own parser when it is installed).
with urllib.request.urlopen(URL + "/health") as h:
    check(h.status == 200, "/health is 200")
with urllib.request.urlopen(URL + "/metrics") as m:
    metrics = m.read().decode()
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("note: prometheus_client not installed; /metrics not parsed")
else:
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    check("moeshard_generated_tokens" in families, "/metrics parses (prometheus_client)")
    dispatches = families["moeshard_node_dispatches"].samples
    check(len(dispatches) == 2 and all(s.value > 0 for s in dispatches), "both nodes answered dispatches")

print("all openai client checks passed")
