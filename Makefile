# Two commands for users: `make demo` and `make test`. Both set up .venv and the dataset first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO   := runs/demo

.PHONY: setup data demo test test-fast bench bench-quick baselines-venv mediapipe-venv clean

setup: $(STAMP) data

# Reinstalls only when pyproject.toml changed (pip then takes torch from the machine's disk).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist"; exit 1; \
	  fi; \
	fi

# The whole job on the embedded default (Fashion-MNIST, small space), sized for a 2-core laptop
# (about 11 minutes): one short training run (float warm start -> fully int8 supernet, 200 + 100
# steps) -> this host's latency table -> search three budgets -> fine-tune each distinct winner
# from its inherited weights (qnas finetune, 100 steps) -> export it with its parity gate -> one
# summary table (inherited and fine-tuned test top-1 side by side).
demo: setup
	$(BIN)/qnas train --space small --steps 300 --float-steps 200 --batch-size 128 --kd-ratio 0.9 --overwrite --out $(DEMO)/train
	$(BIN)/python -m qnas_cli.demo $(DEMO)/train/supernet.pt --out $(DEMO)

test: setup mediapipe-venv
	$(BIN)/python -m pytest -q -rs

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Every benchmark at full size (hours), in an order that runs on a clean clone: supernet_accuracy
# trains the supernet that search_cost, search_quality, scale_finetune, ranking and finetune then use.
# train_stability --resume: a rerun reuses its finished runs where they record the same options.
# fault_injection comes last: it exits 1 on any unclean refusal, and nothing else waits on it.
bench: setup
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.supernet_accuracy
	$(BIN)/python -m benchmarks.train_stability --quick --resume
	$(BIN)/python -m benchmarks.fold_ablation
	$(BIN)/python -m benchmarks.export_parity
	$(BIN)/python -m benchmarks.latency_model
	$(BIN)/python -m benchmarks.search_cost
	$(BIN)/python -m benchmarks.search_quality
	$(BIN)/python -m benchmarks.scale_finetune --supernet runs/bench/supernet_accuracy/default/supernet.pt
	$(BIN)/python -m benchmarks.scale_ranking --jobs 2
	$(BIN)/python -m benchmarks.scale_pareto
	$(BIN)/python -m benchmarks.ranking
	$(BIN)/python -m benchmarks.finetune --threads 2
	@if [ -x .venv-baselines/bin/python ]; then $(BIN)/python -m benchmarks.partial_quant; \
	 else echo "partial_quant skipped: run make baselines-venv first"; fi
	$(BIN)/python -m benchmarks.cost
	$(BIN)/python -m benchmarks.fault_injection

# Every paper claim's benchmark at tiny sizes, into runs/bench-quick (BENCHMARKS.md: the quick
# mode; meant to stay under 30 min on 2 CPU cores). The figures say nothing; that they run does.
QUICK := runs/bench-quick
bench-quick: setup
	$(BIN)/python -m benchmarks.scale_ranking --quick --jobs 2 --out $(QUICK)/scale_ranking
	$(BIN)/python -m benchmarks.scale_pareto --quick --supernets $(QUICK)/scale_ranking --out $(QUICK)/scale_pareto
	$(BIN)/python -m benchmarks.scale_finetune --quick --subnets 3 --steps 20 --out $(QUICK)/scale_finetune \
	  --supernet $(QUICK)/scale_ranking/supernet_predictor/supernet.pt
	$(BIN)/python -m benchmarks.fold_ablation --quick --out $(QUICK)/fold_ablation
	$(BIN)/python -m benchmarks.finetune --quick --out $(QUICK)/finetune
	$(BIN)/python -m benchmarks.ranking --quick --out $(QUICK)/ranking
	@if [ -x .venv-baselines/bin/python ]; then $(BIN)/python -m benchmarks.partial_quant --quick --out $(QUICK)/partial_quant; \
	 else echo "partial_quant skipped: run make baselines-venv first"; fi
	$(BIN)/python -m benchmarks.export_parity --images 200 --out $(QUICK)/export_parity
	$(BIN)/python -m benchmarks.cost --bench $(QUICK)

# The converters a PyTorch user would pick instead (benchmarks/litert_route.py): litert-torch and
# ai-edge-quantizer need ai-edge-litert 2.3 where qnas pins 2.1, so they get a venv of their own.
# Only benchmarks/export_parity.py and partial_quant.py use it; nothing in qnas imports it.
# MediaPipe Tasks, the client the exported files are tested against (tests/test_task_api.py,
# benchmarks/task_api.py), in its own environment: its wheel needs numpy 2, which the converters' pins exclude.
mediapipe-venv: .venv-mediapipe/.installed
.venv-mediapipe/.installed:
	@test -x .venv-mediapipe/bin/python || $(PYTHON) -m venv .venv-mediapipe
	.venv-mediapipe/bin/pip install -q mediapipe==1.2.3
	@touch $@

baselines-venv: .venv-baselines/.installed
.venv-baselines/.installed:
	@test -x .venv-baselines/bin/python || $(PYTHON) -m venv .venv-baselines
	.venv-baselines/bin/pip install -q torch==2.14.1 litert-torch==0.10.0 ai-edge-quantizer==0.10.0
	@touch $@

clean:
	rm -rf $(VENV) .venv-baselines runs .pytest_cache
