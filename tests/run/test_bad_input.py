"""Bad input: a one-line error that names the culprit, exit code 2, no traceback."""

import json

import pytest

from helpers import FAST, run_cli_batch

pytestmark = pytest.mark.slow


def superni_root(tmp_path, name, content):
    root = tmp_path / "data"
    (root / "superni").mkdir(parents=True)
    (root / "superni" / f"{name}.json").write_text(content)
    return root


def ni_task(instances):
    return json.dumps({"Definition": ["Answer."], "Positive Examples": [], "Instances": instances})


CASES = {
    "unknown initializer": (["initializer=foo"], "initializer='foo'"),
    "unknown sequence": (["sequence=nope"], "sequence='nope'"),
    "unknown merge": (["merge=nope"], "merge='nope'"),
    "typo in a group name": (["initialiser=slice"], "unknown group 'initialiser'; did you mean 'initializer'?"),
    "typo in a key": (["trainer.lrr=0.1"], "unknown key 'trainer.lrr'; did you mean 'trainer.lr'?"),
    "model folder not found": (["model.name_or_path=/nonexistent/llama"], "model.name_or_path='/nonexistent/llama'"),
    "c outside [0,1]": (["initializer=slice", "initializer.c=1.5"], "c"),
    "rank too large": (["lora.r=4096"], "lora.r=4096"),
    "negative lr": (["trainer.lr=-0.1"], "trainer.lr"),
    "zero batch": (["trainer.batch_size=0"], "trainer.batch_size"),
    "bad scaling": (["lora.scaling=sqrt"], "lora.scaling"),
    "dropout >= 1": (["lora.dropout=1.5"], "lora.dropout"),
    "bad device": (["device=tpu"], "device"),
    # a wrong type for any key (one schema, infra/config_keys.py; every key: tests/run/test_config_schema.py)
    "weight decay not a number": (
        ["trainer.weight_decay=abc"],
        "trainer.weight_decay='abc' is invalid; valid: a number",
    ),
    "grad norm not a number": (["trainer.max_grad_norm=abc"], "trainer.max_grad_norm='abc' is invalid"),
    "dropout not a number": (["lora.dropout=abc"], "lora.dropout='abc' is invalid; valid: a number in [0, 1)"),
    "seed not an integer": (["seed=abc"], "seed='abc' is invalid; valid: an integer"),
    "alpha a boolean": (["lora.alpha=true"], "lora.alpha=True is invalid; valid: a number > 0"),
    "key of another choice": (["initializer.c=0.5"], "initializer.c is not a key of initializer=vanilla"),
    "no tasks": (["sequence.tasks=[]"], "sequence.tasks"),
    "unknown synthetic task": (["sequence.tasks=[sentiment,telepathy]"], "telepathy"),
    "n_eval zero": (["sequence.n_eval=0"], "sequence.n_eval"),
    "missing data dir": (["data.root=/nonexistent/cl_bench_data"], "/nonexistent/cl_bench_data"),
    "bad general_eval.when": (["general_eval=synthetic", "general_eval.when=sometimes"], "when"),
    "model not on disk offline": (["model=llama3_2_3b_instruct"], "meta-llama/Llama-3.2-3B-Instruct"),
    "missing task data": (["sequence=ni_opp1", "data.root={empty}"], "task088_identify_typo_verification"),
    "malformed JSON task file": (
        ["sequence=ni_opp1", "sequence.tasks=[task088_identify_typo_verification]", "data.root={bad_json}"],
        "task088_identify_typo_verification.json",
    ),
    "task with no instances": (
        ["sequence=ni_opp1", "sequence.tasks=[task088_identify_typo_verification]", "data.root={empty_instances}"],
        "task088_identify_typo_verification",
    ),
    "unknown metric": (
        [
            "sequence=ni_opp1",
            "sequence.tasks=[task088_identify_typo_verification]",
            "data.root={good}",
            "+sequence.metrics={{task088_identify_typo_verification: bleu9}}",
        ],
        "bleu9",
    ),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir):
    """Every case's process, run together (one interpreter, a fork per case: tests/helpers/cli_batch.py)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    empty = tmp / "empty"
    empty.mkdir()
    good = [{"id": f"i{i}", "input": f"word{i}", "output": ["yes" if i % 2 else "no"]} for i in range(12)]
    roots = {
        "empty": empty,
        "bad_json": superni_root(tmp / "b", "task088_identify_typo_verification", '{"Definition": ['),
        "empty_instances": superni_root(tmp / "e", "task088_identify_typo_verification", ni_task([])),
        "good": superni_root(tmp / "g", "task088_identify_typo_verification", ni_task(good)),
    }
    arg_lists = [
        FAST + [a.format(**roots) for a in args] + [f"hydra.run.dir={tmp / f'run{i}'}"]
        for i, (args, _) in enumerate(CASES.values())
    ]
    return dict(zip(CASES, run_cli_batch(arg_lists)))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(name, outcomes):
    proc, culprit = outcomes[name], CASES[name][1]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("cl_bench: error:") and culprit in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
