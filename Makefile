# `make demo` and `make test` set up everything they need on a fresh machine: a virtual environment in .venv with the
# pinned dependencies and this package installed in editable mode.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

DEMO_PROMPT ?= a red circle on a blue background
DEMO_MODEL := models/ldm/shapes
SHAPES_LOGS ?= logs

.PHONY: demo test lint shapes-model serve chromium

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# txt2img with the bundled demo model (a small LDM this project trained on coloured shapes), on the CPU.
demo: $(VENV)/.installed
	$(PY) scripts/txt2img.py --config $(DEMO_MODEL)/config.yaml --ckpt $(DEMO_MODEL)/model.safetensors \
		--prompt "$(DEMO_PROMPT)" --H 64 --W 64 --n_samples 4 --n_iter 1 --n_rows 4 --steps 20 \
		--sampler "DPM++ 2M Karras" --scale 10 --seed 42 --device cpu --precision full --outdir outputs/demo

# The A1111-compatible API and web page on the demo model, at http://127.0.0.1:7860 (scripts/serve.py --help).
serve: $(VENV)/.installed
	$(PY) scripts/serve.py --config $(DEMO_MODEL)/config.yaml --ckpt $(DEMO_MODEL)/model.safetensors --precision full

# Retrain the demo model from scratch (about 50 minutes on 2 CPU cores): autoencoder, then the LDM, then export.
shapes-model: $(VENV)/.installed
	$(PY) main.py --base configs/autoencoder/autoencoder_kl_shapes.yaml -t -n shapes-vae -l $(SHAPES_LOGS) --no-test
	$(PY) main.py --base configs/latent-diffusion/shapes-ldm.yaml -t -n shapes-ldm -l $(SHAPES_LOGS) --no-test \
		model.params.first_stage_config.params.ckpt_path=$$(ls -d $(SHAPES_LOGS)/*_shapes-vae | tail -1)/checkpoints/last.ckpt
	$(PY) scripts/export_model.py --config configs/latent-diffusion/shapes-ldm.yaml --dtype fp16 --vocabulary shapes \
		--ckpt $$(ls -d $(SHAPES_LOGS)/*_shapes-ldm | tail -1)/checkpoints/last.ckpt --out $(DEMO_MODEL) --force

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The optional peers the comparison tests check formats against (diffusers, peft, OpenCV), the server's test
# clients (webuiapi, Playwright) and the OpenVINO engine; never runtime needs.
$(VENV)/.compare-installed: $(VENV)/.installed requirements-compare.txt requirements-bench.txt \
		requirements-server-test.txt requirements-openvino.txt
	$(PY) -m pip install -q -r requirements-compare.txt -r requirements-server-test.txt -r requirements-openvino.txt
	touch $@

# Debian's Chromium for the server page's browser tests (tests/test_server_page.py). Never fails the build: without
# root or a network the note says so and those tests skip with their reason.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "note: could not install chromium (apt-get needs root and a network); tests/test_server_page.py skips"

# Two pytest processes: with OpenVINO's runtime loaded (its TBB threads), a later test that starts a subprocess
# crashed the test process (SIGSEGV) on this CPU, so the tests that load it run on their own.
test: lint $(VENV)/.compare-installed chromium
	$(PY) -m pytest -q -m "not openvino"
	$(PY) -m pytest -q -m openvino
