"""Every default of the regularizer and merge configs says where it comes from (a paper, the authors'
code, or "ours"), and EWC's says how to transfer a λ from avalanche or mammoth."""

from __future__ import annotations

import re

import pytest
import yaml

from helpers import REPO

SOURCE = re.compile(
    r"\bours\b|paper|authors'|\bcode\b|Eq\.|et al|App\. |Table|PEFT|PS-LoRA|GPM's|O-LoRA's|SLICE|Huszar|Schwarz"
)
YAMLS = sorted((REPO / "conf" / "regularizer").glob("*.yaml")) + sorted((REPO / "conf" / "merge").glob("*.yaml"))


def _key_comments(path):
    """{top-level key: its comment, continuation lines included} for every plain key of a group YAML."""
    comments, key = {}, None
    for line in path.read_text().splitlines():
        match = re.match(r"^([a-z]\w*):[^#]*(#.*)?$", line)
        if match:
            key = match.group(1)
            comments[key] = match.group(2) or ""
        elif key and re.match(r"^\s+#", line):
            comments[key] += " " + line.strip()
        else:
            key = None
    return comments


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_default_names_its_source(path):
    keys = {k for k in yaml.safe_load(path.read_text()) if not k.startswith("_")}
    comments = _key_comments(path)
    assert set(comments) == keys, path
    missing = {k: c for k, c in comments.items() if not SOURCE.search(c)}
    assert not missing, f"{path.name}: defaults without a source: {missing}"


def test_ewc_says_what_to_multiply_to_transfer_lambda_from_avalanche_and_mammoth():
    text = (REPO / "conf" / "regularizer" / "ewc.yaml").read_text()
    assert "lam/2 * sum F * dW_t^2" in text
    assert "avalanche EWCPlugin" in text and "lam = 2 * ewc_lambda" in text and "lam ~ 2 * ewc_lambda / b" in text
    assert "mammoth ewc_on" in text and "lam = 2 * e_lambda" in text
