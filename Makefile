# Every target installs what it needs into .venv first (a fresh machine needs only python3.11).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= disabled

.PHONY: install demo test lint bench claim real-claims real-report clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: tiny model, synthetic sequence, CPU. Each call writes a
# new run dir (outputs/synthetic/vanilla/<time>); pass a fixed hydra.run.dir to resume one.
demo: $(STAMP)
	$(BIN)/python -m cl_bench

# One test process per core (pytest-xdist), each single-threaded; a test file stays on one process
# (its module fixtures, e.g. a reference run, are built once). `pytest tests` alone runs serially.
test: $(STAMP)
	$(BIN)/python -m pytest tests -n auto --dist loadfile --durations=15

# The formatter and linter (settings in pyproject.toml); `ruff format cl_bench tests` applies the format.
lint: $(STAMP)
	$(BIN)/ruff check cl_bench tests
	$(BIN)/ruff format --check cl_bench tests

# Speed and memory figures (not timed tests), one script on CPU or GPU: per phase (capture,
# SVD/projection, train, merge, evaluation, GP/IP) time, tokens/s, examples/s, peak memory,
# cl_bench against the SLICE authors' recipe side by side (tiny, 3B-shaped and SmolLM2 rows) -> bench.json,
# docs/performance.md generated from it
# (python -m cl_bench.bench --help); then the exhaustive sequence-mining search over C(46,5).
bench: $(STAMP)
	$(BIN)/python -m cl_bench.bench
	$(BIN)/python -m cl_bench.bench.doc bench.json --out docs/performance.md
	$(BIN)/python -m cl_bench.mine --bench
	$(BIN)/python -m cl_bench.branch_cost

# The SLICE claim on the embedded benchmark (README "The SLICE claim"): both sweeps
# (66 jobs, 2 at a time, resumable: rerun to continue), then docs/results.md from their run dirs.
claim: $(STAMP)
	$(BIN)/python -m cl_bench -m --config-dir . --config-name multirun experiment=slice_claim hydra/launcher=local_jobs
	$(BIN)/python -m cl_bench -m --config-dir . --config-name multirun experiment=slice_claim_alpha hydra/launcher=local_jobs
	$(BIN)/python -m cl_bench.report multirun/slice_claim --baseline vanilla --plots summary --out docs/results \
		--markdown docs/results.md --title "The SLICE claim on the embedded benchmark" \
		$(if $(wildcard docs/results_notes.md),--notes docs/results_notes.md)

# The three papers' claims on a real model on a CPU (README "A real benchmark on a CPU"): both sweeps
# (SmolLM2; experiment=real_claims_standard / real_claims_opposite, 2 jobs at a time, resumable: rerun to
# continue), then docs/results-real.md from their run dirs. DATA (data.root through CL_BENCH_DATA): a folder
# with cl_benchmark/ and superni/.
DATA ?= $(or $(CL_BENCH_DATA),../shared/data)
real-claims: $(STAMP)
	CL_BENCH_DATA=$(DATA) $(BIN)/python -m cl_bench -m --config-dir . --config-name multirun experiment=real_claims_opposite hydra/launcher=local_jobs
	CL_BENCH_DATA=$(DATA) $(BIN)/python -m cl_bench -m --config-dir . --config-name multirun experiment=real_claims_standard hydra/launcher=local_jobs
	$(MAKE) real-report

# docs/results-real.md from whatever of the two sweeps has finished (each table states its n).
real-report: $(STAMP)
	$(BIN)/python -m cl_bench.report multirun/real_claims --baseline vanilla --plots summary --out docs/results-real \
		--markdown docs/results-real.md --title "Three papers' claims on a real model on a CPU (SmolLM2-135M-Instruct)" \
		$(if $(wildcard docs/results-real_notes.md),--notes docs/results-real_notes.md)

clean:
	rm -rf outputs .pytest_cache
