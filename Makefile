# tread_scale: every target installs what it needs (a venv from pinned versions) before using it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# DeepSpeed JIT-compiles small ops on first use; keep them in the project, not in the home folder.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
STAMP  := $(VENV)/.installed
S3RVER := .cache/s3rver/node_modules/.bin/s3rver

.PHONY: demo test test-quick venv s3rver bench docker-lint docker-check clean

# Run the demo end to end: embedded S3 server, demo dataset as MDS, TREAD training on CPU, samples.
# `make demo DEMO=text`: the text-to-image demo (captioned shapes, a tiny local T5, a TREAD MMDiT).
demo: $(STAMP)
	$(PY) -m tread_scale.devtools.demo $(if $(DEMO),--demo $(DEMO))

# Run the test suite (starts its own s3rver on 127.0.0.1), then check that nothing was left in /dev/shm.
test: $(STAMP) $(S3RVER)
	@mkdir -p .cache && ls -1 /dev/shm > .cache/shm.before 2>/dev/null || true
	$(PY) -m pytest -q -p no:cacheprovider
	@ls -1 /dev/shm > .cache/shm.after 2>/dev/null || true
	@if comm -13 .cache/shm.before .cache/shm.after | grep -q .; then \
	  echo "files left in /dev/shm by the tests:"; comm -13 .cache/shm.before .cache/shm.after; exit 1; fi

# The suite without the tests marked slow (multi-rank backends, kill -9 resume, FID, Slurm): a few minutes.
test-quick: $(STAMP) $(S3RVER)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "tread_scale needs Python 3.11, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $(STAMP)

# s3rver (npm): a keep-alive, signature-checking S3 server that the tests run on 127.0.0.1.
s3rver: $(S3RVER)

$(S3RVER):
	mkdir -p .cache/s3rver
	cd .cache/s3rver && npm install --no-audit --no-fund --silent --no-save s3rver@3.7.1

# Dockerfile: hadolint (from the pinned venv), then a real build with buildah and a smoke run in the image.
docker-lint: $(STAMP)
	$(VENV)/bin/hadolint --no-color Dockerfile

docker-check: docker-lint
	scripts/docker_build_check.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py --model B/2

clean:
	rm -rf $(VENV) .cache runs
