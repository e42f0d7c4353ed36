"""bestrq2: fast, faithful BEST-RQ-2 pretraining and a drop-in audio encoder.

The Triton kernels live in ``kernels/`` and install as ``bestrq2.kernels``: the top-level name
``kernels`` is taken on the package index, so nothing here installs it.
"""
from setuptools import setup

setup(
    name="bestrq2",
    version="0.1.0",
    description="Fast, faithful BEST-RQ-2 (contextualize-then-predict) audio pretraining",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # every subpackage by name (a plain ``pip install .`` used to leave out bestrq2.data and bestrq2.eval)
    packages=["bestrq2", "bestrq2.data", "bestrq2.eval", "bestrq2.kernels"],
    package_dir={"bestrq2": "bestrq2", "bestrq2.kernels": "kernels"},
    package_data={"bestrq2": ["attention_wins.json"]},
    # torch: any recent release. requirements/torch-cpu.txt pins the CPU wheel used here and in CI;
    # a GPU machine keeps (or gets) a CUDA build of its own.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "soundfile>=0.12",
        "scipy>=1.10",
        "tqdm>=4.60",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "dev": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5", "tensorboard>=2.10",
                "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        "onnx": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        "tensorboard": ["tensorboard>=2.10"],
        "bench": ["matplotlib>=3.5", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["bestrq2=bestrq2.cli:main"]},
)
