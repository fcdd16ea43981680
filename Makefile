# The README's commands. Every target sets up .venv idempotently (stamps), so on a fresh machine
# `make demo` and `make test` are all a user types.
#   VENV_FLAGS=--system-site-packages  reuse a preinstalled torch (e.g. on a GPU machine)
#   TORCH_CUDA_ARCH_LIST, FORCE_CUDA, SMTC_FAST_NO_CUDA, SMTC_FAST_NO_EXTENSION, MAX_JOBS, DEBUG: see setup.py
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := $(VENV)/.stamp-deps
BUILT := $(VENV)/.stamp-built
CSRC := $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: all venv build test test-slow test-cuda test-cuda-emu test-cuda-emu-asan test-cuda-emu-tsan ptxas demo bench ctest clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

# torch: keep an installed torch >= 2.6 (never reinstall it on a machine that brought its own); otherwise
# the regular PyPI build (a CUDA build that runs fine on the CPU; PyPI's torchvision needs it).
$(DEPS): pyproject.toml Makefile | $(PY)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch, torchvision; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); assert v >= (2, 6)" 2>/dev/null \
		|| $(PIP) install -q torch torchvision
	$(PIP) install -q "timm>=1.0" numpy scipy pybind11 ninja pytest cmake tqdm pillow matplotlib av
	touch $@

$(BUILT): $(DEPS) setup.py $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(DEPS)
build: $(BUILT)

# The extension just built must import: otherwise every kernel test would fall back to the references.
test: $(BUILT)
	$(PY) -c "import smtc_fast, json; print(json.dumps(smtc_fast.build_info(), indent=1))"
	$(PY) -c "from smtc_fast.testing import check_build_loaded; check_build_loaded()"
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS) python_tests

test-slow: $(BUILT)
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS) python_tests

test-cuda: $(BUILT)
	$(PY) -m pytest -m cuda -q $(PYTEST_ARGS) python_tests

# The CUDA kernels run on the CPU by the execution tier (csrc/common/cuda_emu.h), under two thread schedules
# (python_tests/conftest.py EMU_SCHEDULES). `make test` runs these too.
test-cuda-emu: $(BUILT)
	$(PY) -m pytest -m cuda_emu -q $(PYTEST_ARGS) python_tests

# The execution tier (and the whole extension) built with a sanitizer, in a copy under build-<name>/ so the regular
# build stays as it is; the tests run with the sanitizer's runtime preloaded into Python. ASan + UBSan: out-of-bounds
# and use-after-free in the kernels and launchers. TSan: races between blocks on global memory (the tier runs a
# launch's blocks on 3 OS threads there, SMTC_FAST_EMU_THREADS=3; left out: the 65537-frame grid test, whose 17 M
# fiber switches take TSan hours, and the tier's `slow` cases, the large propagation grids (one of them, stride-8
# blackswan, ran > 15 min under TSan; the same kernel code runs there at the small shapes, and `make test-cuda-emu`
# runs them without TSan). Not part of `make test`.
SAN_COPY = rm -rf build-$(1) && mkdir -p build-$(1)/src && cp -r csrc smtc_fast python_tests setup.py pyproject.toml build-$(1)/src/ \
	&& rm -f build-$(1)/src/smtc_fast/_C*.so && cd build-$(1)/src \
	&& SMTC_FAST_NO_CUDA=1 SMTC_FAST_EMU_SANITIZE=$(2) MAX_JOBS=$${MAX_JOBS:-2} $(abspath $(PY)) setup.py -q build_ext --inplace > ../build.log 2>&1 || (tail -50 ../build.log; exit 1)
test-cuda-emu-asan: $(DEPS)
	$(call SAN_COPY,asan,address)
	cd build-asan/src && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(abspath $(PY)) -m pytest -m cuda_emu -q -p no:cacheprovider $(PYTEST_ARGS) python_tests
test-cuda-emu-tsan: $(DEPS)
	$(call SAN_COPY,tsan,thread)
	cd build-tsan/src && LD_PRELOAD="$$(gcc -print-file-name=libtsan.so)" SMTC_FAST_EMU_THREADS=3 OMP_NUM_THREADS=1 \
		TSAN_OPTIONS=halt_on_error=1:report_signal_unsafe=0 \
		$(abspath $(PY)) -m pytest -m "cuda_emu and not slow" -q -p no:cacheprovider -k "not many_frames" $(PYTEST_ARGS) \
		python_tests

# ptxas resource use of every CUDA kernel (registers, shared memory, spills) for sm_80 and sm_90, checked against
# csrc/tests/ptxas_budget.json: a kernel that spills or outgrows its budget fails (python_tests/test_ptxas.py runs
# the same check in `make test` wherever nvcc is found).
ptxas: $(DEPS)
	$(PY) csrc/tests/ptxas_report.py

demo: $(BUILT)
	$(VENV)/bin/smtc demo

bench: $(BUILT)
	$(PY) bench/bench_ops.py --json bench_out/bench_ops.json
	$(PY) bench/bench_propagation.py --json bench_out/bench_propagation.json
	$(PY) bench/bench_eval.py --json bench_out/bench_eval.json
	$(PY) bench/bench_data.py --json bench_out/bench_data.json

clean:
	rm -rf build build-asan build-tsan *.egg-info smtc_fast/_C*.so $(BUILT)

# C++ build of csrc/ against libtorch (compile_commands.json in build-cmake/) and its test under ctest.
ctest: $(DEPS)
	$(VENV)/bin/cmake -S . -B build-cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja $$($(PY) csrc/tests/cmake_args.py) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	$(VENV)/bin/cmake --build build-cmake -j $${MAX_JOBS:-2}
	cd build-cmake && LD_LIBRARY_PATH=$$($(abspath $(PY)) -c "import glob, os, nvidia; print(':'.join(glob.glob(os.path.join(os.path.dirname(nvidia.__path__[0]), 'nvidia', 'cu[0-9]*', 'lib'))))"):$$LD_LIBRARY_PATH ../$(VENV)/bin/ctest --output-on-failure
