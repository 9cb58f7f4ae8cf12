# Two commands do all set-up on a fresh machine (see README):
#   make demo   install, build the embedded demo shards, train with torchrun on 2 processes, zero-shot and
#               retrieval evals
#   make test   install, run the test suite
#   make lint   install, ruff check + mypy on the typed modules + lint-imports (CI runs it before the tests)
# Both are idempotent: the venv is reinstalled only when pyproject.toml or constraints.txt change, demo
# shards are built once, and a finished demo run resumes from its last checkpoint with nothing left to do.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
RUN ?= runs/demo
# Extra dotted overrides for the demo's training, e.g. DEMO_ARGS=train.seed=1 RUN=runs/demo-seed1
DEMO_ARGS ?=
# Debian packages: espeak-ng and flite speak the demo's audio (two synthesisers: held-out voices are another's);
# ffmpeg's libraries back torchcodec (torchaudio's decoder).
APT_PACKAGES := espeak-ng flite ffmpeg

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "WARNING: missing system packages ($$missing); install them (e.g. sudo apt-get install $$missing)"; fi; \
	fi
	@free=$$(df -Pk . | awk 'NR==2 {print $$4}'); if [ "$$free" -lt 7000000 ]; then \
	  echo "WARNING: $$((free / 1024)) MiB free in $$(pwd); the venv needs about 6 GiB (torch's CUDA build)"; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# One pip call under the constraints file: torch/torchvision/torchaudio/torchcodec come out matched.
	# No pip cache: it would hold a second copy of every downloaded wheel on the same disk.
	$(BIN)/pip install -q --disable-pip-version-check --no-cache-dir -c constraints.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/python data_pipelines/demo_digits.py --out data/demo
	PATH=$(BIN):$$PATH NPROC=$(NPROC) launchers/torchrun.sh train --config demo train.out_dir=$(RUN) $(DEMO_ARGS)
	$(MAKE) --no-print-directory -j$(EVAL_JOBS) --output-sync=target demo-evals
	$(BIN)/python data_pipelines/demo_report.py $(RUN)

# The demo's held-out evals, EVAL_JOBS at a time: each is one process, most of whose time goes to importing
# torch and loading the model (2 cores, 71-79 s one after another in three runs, 43-54 s two at a time in four).
# Each writes $(RUN)/NAME.json (zero-shot also NAME.png) and prints its one-line summary.
EVAL_JOBS ?= 2
DEMO_EVALS := zeroshot zeroshot_audio zeroshot_audio_seen zeroshot_video retrieval_image-text \
  retrieval_audio-text retrieval_video-text retrieval_video-audio caption
# What each eval is (`mmpt eval ...`, less --model and --out, which every one gets alike).
EVAL_zeroshot := zeroshot
EVAL_zeroshot_audio := zeroshot --modality audio --data data/demo/speech-val --classes data/demo/speech-classes.json
EVAL_zeroshot_audio_seen := zeroshot --modality audio --data data/demo/speech-val-seen \
  --classes data/demo/speech-classes.json
EVAL_zeroshot_video := zeroshot --modality video --data data/demo/motion-val --classes data/demo/motion-classes.json
EVAL_retrieval_image-text := retrieval --pair image-text --data data/demo/val
EVAL_retrieval_audio-text := retrieval --pair audio-text --data data/demo/speech-val
EVAL_retrieval_video-text := retrieval --pair video-text --data data/demo/motion-val
EVAL_retrieval_video-audio := retrieval --pair video-audio --data data/demo/motion-val
EVAL_caption := caption --data data/demo/val
.PHONY: demo-evals $(addprefix eval-,$(DEMO_EVALS))

demo-evals: $(addprefix eval-,$(DEMO_EVALS))

# A static pattern rule: make skips implicit (%) rules for phony targets.
$(addprefix eval-,$(DEMO_EVALS)): eval-%: $(STAMP)
	$(BIN)/mmpt eval $(EVAL_$*) --model $(RUN) --out $(RUN)/$*.json > /dev/null

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs data/demo
