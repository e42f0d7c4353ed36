# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PY ?= python3

.PHONY: install demo test

install:
	bash scripts/install.sh

demo: install
	bestrq2 pretrain --preset tiny --steps 300 --batch-size 8 --out runs/demo --overwrite
	bestrq2 synth runs/demo/example.wav --seconds 12.5
	bestrq2 embed runs/demo/example.wav --model runs/demo/encoder --out runs/demo/example_frames.npy

test: install
	$(PY) -m pytest -q --durations=25
	# the official fixtures (and the input checks' reductions) once more on ATen's scalar path: another FFT/BLAS rounding;
	# and --compile there, after the run above filled inductor's cache with AVX512 kernels (they must not be reused)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q tests/test_official.py tests/test_frontend.py tests/test_inputs.py \
		tests/test_train.py::test_compile_and_tensorboard
