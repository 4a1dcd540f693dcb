"""Every ``lorakit`` command × every input family that applies to it: exit 2, the culprit named,
no traceback. Run in process (``lorakit.cli.main``) on a tiny model, so the whole matrix is fast.

A case is ``(command, family, build)`` where ``build(world)`` returns the argv and the strings
the message must contain. The families and their counts are printed by ``test_matrix_size``.
"""

from __future__ import annotations

import socket
from collections import Counter

import pytest
from bad_input.bad_helpers import (
    ADAPTER_FAMILIES,
    BASE_FREE,
    CONFIG,
    DATA_FAMILIES,
    MODEL_FAMILIES,
    WEIGHTS,
    YAML_FAMILIES,
    refused,
)


def _model_cases():
    for family in MODEL_FAMILIES:
        def bad(world, family=family):
            return world.bad_models[family]
        yield "data check", f"model/{family}", family not in WEIGHTS | CONFIG, \
            lambda w, bad=bad: (["data", "check", w.data, "--model", bad(w)[0], "--no-cache"], [bad(w)[1]])
        yield "train", f"model/{family}", True, \
            lambda w, bad=bad: (["train", w.config, f"model={bad(w)[0]}", "--quiet"], [bad(w)[1]])
        yield "eval", f"model/{family}", True, \
            lambda w, bad=bad: (["eval", "--base", bad(w)[0], "--adapter", w.adapter, "--data", w.data,
                                 "--out", w.root / "eval-out", "--quiet"], [bad(w)[1]])
        yield "merge", f"model/{family}", True, \
            lambda w, bad=bad: (["merge", "--base", bad(w)[0], "--adapter", w.adapter, "--out", w.root / "merged"],
                                [bad(w)[1]])
        yield "serve", f"model/{family}", True, \
            lambda w, bad=bad: (["serve", "--base", bad(w)[0], "--port", "0"], [bad(w)[1]])
        # spectrum ranks the weight files themselves; config.json is not read
        yield "spectrum", f"model/{family}", family not in CONFIG, \
            lambda w, bad=bad: (["spectrum", bad(w)[0], "--no-cache"], [bad(w)[1]])
        yield "estimate", f"model/{family}", family not in WEIGHTS, \
            lambda w, bad=bad: (["estimate", bad(w)[0]], [bad(w)[1]])
        # the adapter form reads a transformers base's config.json only (the layout), not its weights
        yield "export", f"model/{family}", family != "truncated_safetensors", \
            lambda w, bad=bad, family=family: (["export", w.adapter, "--to", "gguf", "--base", bad(w)[0],
                                                "--out", w.root / f"export-{family}.gguf"], [bad(w)[1]])


def _adapter_cases():
    for family in ADAPTER_FAMILIES:
        def bad(world, family=family):
            return world.bad_adapters[family]
        yield "inspect", f"adapter/{family}", family not in BASE_FREE, \
            lambda w, bad=bad: (["inspect", bad(w)[0]], [bad(w)[1]])
        yield "merge", f"adapter/{family}", True, \
            lambda w, bad=bad: (["merge", "--base", w.model, "--adapter", bad(w)[0], "--out", w.root / "merged"],
                                [bad(w)[1]])
        yield "combine", f"adapter/{family}", family not in BASE_FREE, \
            lambda w, bad=bad: (["combine", w.adapter, bad(w)[0], "--out", w.root / "combined"], [bad(w)[1]])
        yield "eval", f"adapter/{family}", True, \
            lambda w, bad=bad: (["eval", "--base", w.model, "--adapter", bad(w)[0], "--data", w.data,
                                 "--out", w.root / "eval-out", "--quiet", "--no-generate"], [bad(w)[1]])
        yield "serve", f"adapter/{family}", True, \
            lambda w, bad=bad: (["serve", "--base", w.model, "--adapter", f"bad={bad(w)[0]}", "--port", "0"],
                                [bad(w)[1]])
        yield "export", f"adapter/{family}", True, \
            lambda w, bad=bad, family=family: (["export", bad(w)[0], "--to", "gguf", "--base", w.model,
                                                "--out", w.root / f"export-{family}.gguf"], [bad(w)[1]])


def _data_cases():
    for family in DATA_FAMILIES:
        def bad(world, family=family):
            return world.bad_data[family]
        skip = ["--skip-bad-rows"] if family == "zero_usable_rows" else []
        yield "data check", f"data/{family}", True, \
            lambda w, bad=bad, skip=skip: (["data", "check", bad(w)[0], "--model", w.model, "--no-cache", *skip],
                                           [bad(w)[1]])
        yield "train", f"data/{family}", True, \
            lambda w, bad=bad: (["train", w.config, f"data.train={bad(w)[0]}", "--quiet"], [bad(w)[1]])
        yield "train", f"eval-data/{family}", True, \
            lambda w, bad=bad: (["train", w.config, f"data.eval={bad(w)[0]}", "--quiet"], [bad(w)[1]])
        yield "eval", f"data/{family}", True, \
            lambda w, bad=bad: (["eval", "--base", w.model, "--adapter", w.adapter, "--data", bad(w)[0],
                                 "--out", w.root / "eval-out", "--quiet"], [bad(w)[1]])


def _yaml_cases():
    for family in YAML_FAMILIES:
        def bad(world, family=family):
            return world.bad_yaml[family]
        yield "train", f"yaml/{family}", True, lambda w, bad=bad: (["train", bad(w)[0], "--quiet"], [bad(w)[1]])


# (command, flag, bad values) for every numeric flag: out of range and wrong type.
NUMERIC = [
    ("data check", "--max-length", ["0", "-3", "many"]),
    ("estimate", "--rank", ["0", "x"]), ("estimate", "--seq", ["-1", "1.5"]), ("estimate", "--batch", ["0", "two"]),
    ("estimate", "--grad-accum", ["0", "x"]), ("estimate", "--dropout", ["1.5", "nan"]),
    ("estimate", "--top", ["150", "lots"]),
    ("spectrum", "--top", ["-1", "101", "inf"]),
    ("eval", "--limit", ["0", "ten"]), ("eval", "--max-length", ["0", "x"]), ("eval", "--batch-size", ["-2", "x"]),
    ("eval", "--max-new-tokens", ["0", "x"]), ("eval", "--general-limit", ["0", "x"]),
    ("combine", "--weights", ["inf", "w"]), ("combine", "--rank", ["0", "x"]), ("combine", "--density", ["0", "1.5"]),
    ("combine", "--seed", ["-1", "x"]),
    ("serve", "--port", ["70000", "-1", "http"]), ("serve", "--max-loaded", ["0", "x"]),
    ("serve", "--max-rank", ["0", "x"]), ("serve", "--max-batch", ["0", "x"]), ("serve", "--max-queue", ["-1", "x"]),
    ("serve", "--max-context", ["0", "x"]), ("serve", "--max-body-bytes", ["0", "x"]),
    ("train", "--nproc", ["0", "x"]),
]


def _numeric_cases():
    for command, flag, values in NUMERIC:
        for value in values:
            def build(w, command=command, flag=flag, value=value):
                base = {"data check": ["data", "check", w.data, "--model", w.model],
                        "estimate": ["estimate", w.model], "spectrum": ["spectrum", w.model],
                        "eval": ["eval", "--base", w.model, "--adapter", w.adapter, "--data", w.data],
                        "combine": ["combine", w.adapter, w.adapter, "--out", w.root / "combined"],
                        "serve": ["serve", "--base", w.model], "train": ["train", w.config]}[command]
                return [*base, f"{flag}={value}"], [flag, value]
            yield command, f"flag/{flag}={value}", True, build


# Values inside the training YAML, given as key=value overrides: the dotted key is the culprit.
OVERRIDES = [("train.lr=-1", "train.lr"), ("train.lr=fast", "train.lr"), ("adapter.r=0", "adapter.r"),
             ("adapter.r=2.5", "adapter.r"), ("adapter.dropout=1.5", "adapter.dropout"),
             ("train.batch_size=0", "train.batch_size"), ("train.epochs=-1", "train.epochs"),
             ("data.max_length=0", "data.max_length"), ("train.grad_accum=x", "train.grad_accum"),
             ("adapter.method=prefix", "adapter.method"), ("data.format=tsv", "data.format"),
             ("adapter.targets=[nope_proj]", "nope_proj"), ("adapter.alpha=[1]", "adapter.alpha"),
             ("train.warmup_steps=-5", "train.warmup_steps"), ("nokey", "nokey"),
             ("train.learning_rate=0.1", "learning_rate")]


def _override_cases():
    for item, culprit in OVERRIDES:
        yield "train", f"override/{item}", True, \
            lambda w, item=item, culprit=culprit: (["train", w.config, item, "--quiet"], [culprit])


def _other_cases():
    yield "estimate", "choice/method", True, lambda w: (["estimate", w.model, "--method", "prefix"], ["prefix"])
    yield "estimate", "choice/gpu", True, lambda w: (["estimate", w.model, "--gpu", "lots"], ["lots"])
    yield "estimate", "choice/dtype", True, lambda w: (["estimate", w.model, "--dtype", "int3"], ["int3"])
    yield "combine", "weights/count", True, \
        lambda w: (["combine", w.adapter, w.adapter, "--weights", "1", "--out", w.root / "c"],
                   ["1 weight(s)", "one weight per adapter"])
    yield "combine", "out/exists", True, \
        lambda w: (["combine", w.adapter, w.adapter, "--out", w.adapter], [str(w.adapter)])
    yield "merge", "out/exists", True, \
        lambda w: (["merge", "--base", w.model, "--adapter", w.adapter, "--out", w.adapter], [str(w.adapter)])
    yield "merge", "max-shard-size", True, \
        lambda w: (["merge", "--base", w.model, "--adapter", w.adapter, "--out", w.root / "m2",
                    "--max-shard-size", "huge"], ["huge"])
    yield "serve", "adapter/spec", True, lambda w: (["serve", "--base", w.model, "--adapter", "noequals"],
                                                    ["noequals"])
    yield "serve", "adapter-root/missing", True, \
        lambda w: (["serve", "--base", w.model, "--adapter-root", w.root / "nowhere"], ["nowhere"])
    yield "serve", "host/not-ours", True, lambda w: (["serve", "--base", w.model, "--host", "192.0.2.1",
                                                      "--api-key", "k"], ["192.0.2.1"])
    yield "spectrum", "out/folder", True, lambda w: (["spectrum", w.model, "--out", w.root], [str(w.root)])
    yield "eval", "metric/unknown", True, \
        lambda w: (["eval", "--base", w.model, "--adapter", w.adapter, "--data", w.data, "--metrics", "bleurgh"],
                   ["bleurgh"])
    yield "eval", "metric/module", True, \
        lambda w: (["eval", "--base", w.model, "--adapter", w.adapter, "--data", w.data, "--metric",
                    "no_such_module_xyz:f"], ["no_such_module_xyz"])
    yield "eval", "json-schema/missing", True, \
        lambda w: (["eval", "--base", w.model, "--adapter", w.adapter, "--data", w.data, "--json-schema",
                    w.root / "schema.json"], ["schema.json"])
    yield "eval", "general/missing", True, \
        lambda w: (["eval", "--base", w.model, "--adapter", w.adapter, "--data", w.data, "--general",
                    w.root / "general-gone.jsonl"], ["general-gone.jsonl"])
    yield "data check", "chat-template/not-jinja", True, \
        lambda w: (["data", "check", w.data, "--model", w.model, "--chat-template", "chatml-please"],
                   ["chatml-please"])
    yield "data check", "chat-template/jinja-syntax", True, \
        lambda w: (["data", "check", w.data, "--model", w.model, "--chat-template", "{% for m in messages %}{{ m"],
                   ["template"])
    yield "eval", "tasks/nothing-to-do", True, lambda w: (["eval", "--base", w.model], ["--data", "--tasks"])
    yield "eval", "tasks/include-path-alone", True, \
        lambda w: (["eval", "--base", w.model, "--data", w.data, "--include-path", w.root], ["--include-path"])
    yield "eval", "tasks/unknown", True, \
        lambda w: (["eval", "--base", w.model, "--tasks", "no_such_task_xyz"], ["no_such_task_xyz"])
    yield "eval", "tasks/include-path-missing", True, \
        lambda w: (["eval", "--base", w.model, "--tasks", "mine", "--include-path", w.root / "no-tasks-here"],
                   ["no-tasks-here"])
    yield "eval", "flag/--num-fewshot=-1", True, \
        lambda w: (["eval", "--base", w.model, "--tasks", "x", "--num-fewshot=-1"], ["--num-fewshot", "-1"])
    # a tokenizer without a chat template, for `messages` data: the row, the model and the fix are named
    no_template = ["train.jsonl line 1", "no-chat-template", "has none", "chat_template: plain"]
    yield "data check", "chat-template/none", True, \
        lambda w: (["data", "check", w.data, "--model", w.no_template, "--no-cache"], no_template)
    yield "train", "chat-template/none", True, \
        lambda w: (["train", w.config, f"model={w.no_template}", "--quiet"], no_template)
    yield "eval", "chat-template/none", True, \
        lambda w: (["eval", "--base", w.no_template, "--adapter", w.adapter, "--data", w.data,
                    "--out", w.root / "eval-out", "--quiet"], no_template)
    yield "train", "resume/missing", True, \
        lambda w: (["train", w.config, "--resume", w.root / "no-checkpoint"], ["no-checkpoint"])


CASES = [case for source in (_model_cases, _adapter_cases, _data_cases, _yaml_cases, _numeric_cases,
                             _override_cases, _other_cases) for case in source() if case[2]]


def test_matrix_size():
    by_command = Counter(command for command, *_ in CASES)
    by_family = Counter(family.split("/")[0] for _, family, *_ in CASES)
    print(f"{len(CASES)} CLI cases; by command: {dict(by_command)}; by family: {dict(by_family)}")
    assert len(CASES) >= 150
    assert set(by_command) >= {"data check", "train", "eval", "merge", "combine", "serve", "inspect", "spectrum",
                               "estimate", "export"}


@pytest.mark.parametrize("build", [c[3] for c in CASES], ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_refused(world, build):
    argv, culprits = build(world)
    refused(argv, *culprits)


def test_plain_template_on_request_trains_where_auto_refused(world):
    from bad_input.bad_helpers import run_cli

    result = run_cli(["data", "check", world.data, "--model", world.no_template, "--no-cache",
                      "--chat-template", "plain"])
    assert result.code == 0, result.err
    assert "12" in result.out, result.out


def test_serve_refuses_a_port_in_use_before_loading_the_model(world):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused(["serve", "--base", world.model, "--port", port], f"127.0.0.1:{port}", "already in use")


def test_a_bug_is_one_line_naming_the_command_and_debug_shows_the_traceback(monkeypatch):
    import lorakit.commands.inspect as command
    from bad_input.bad_helpers import TRACEBACK, run_cli

    def broken(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(command, "run", broken)
    result = run_cli(["inspect", "anything"])
    assert result.code == 1 and TRACEBACK not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "`lorakit inspect` failed unexpectedly" in lines[0]
    assert "RuntimeError: an internal invariant failed" in lines[0] and "--debug" in lines[0]
    with pytest.raises(RuntimeError, match="internal invariant"):
        run_cli(["--debug", "inspect", "anything"])
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="internal invariant"):
        run_cli(["inspect", "anything"])
