"""megatron-let: Late-to-Early Training for Megatron-Core GPT pretraining."""

from setuptools import find_packages, setup

setup(
    name="megatron-let",
    version="0.1.0",
    description="Late-to-Early Training (LET) plugin for NVIDIA Megatron-Core / Megatron-LM GPT pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    classifiers=["Programming Language :: Python :: 3.10", "Programming Language :: Python :: 3.11",
                 "Programming Language :: Python :: 3.12"],
    packages=find_packages(include=["megatron_let", "megatron_let.*"]),
    py_modules=["pretrain_gpt_let", "pretrain_bridge_let"],
    # the Megatron-LM patch (python -m megatron_let.integrations.patching) must ship with non-editable installs
    data_files=[("share/megatron-let/patches", ["patches/pretrain_gpt.core_v0.16.1.patch",
                                                "patches/pretrain_gpt.core_v0.19.0.patch"])],
    install_requires=[
        # torch is not pinned here: on CPU machines install torch==2.13.0 first (.ci/run does), so pip
        # keeps that build (Python 3.11: the CPU wheel; 3.12: the index has only the CUDA build, which runs on CPU).
        "torch>=2.4",
        # supported 0.16-0.19 (tested: 0.16.1 on Python 3.11, 0.19.x on 3.12). No upper pin: pip must not
        # downgrade an NGC container's megatron-core; pretrain_gpt_let.py refuses an unsupported one in one line
        "megatron-core>=0.16",
        "transformers>=4.56",
        "safetensors",
        "psutil",  # needed by megatron-core's torch_dist checkpoint writer
        "numpy",
    ],
    extras_require={
        # the quickstart test needs matplotlib + tensorboard, the GGUF teacher tests gguf + accelerate,
        # the downstream-eval tests pyarrow
        "test": ["pytest>=8", "hypothesis", "matplotlib", "tensorboard", "gguf", "accelerate", "pyarrow"],
        "quickstart": ["matplotlib", "tensorboard"],
        "gguf": ["gguf", "accelerate"],  # transformers' gguf_file= loading needs both
        "eval": ["pyarrow"],  # python -m megatron_let.evaluation.downstream reads the OLMo eval sets' Arrow files
        # Megatron-Bridge (Python 3.12; pretrain_bridge_let.py, docs/bridge.md): the version tested, with its own deps.
        "bridge": ["megatron-bridge==0.6.2"],
        # CPU machines and CI: pip install --no-deps megatron-bridge==0.6.2, then this: what Bridge's training path
        # imports (TransformerEngine, ModelOpt, nvidia-resiliency-ext, energon: placeholders, compat/cpu_bridge.py)
        "bridge-cpu": ["omegaconf>=2.3.0", "hydra-core>=1.3.4,<1.4", "einops", "datasets>=2.20.0", "diffusers>=0.36.0"],
        # GPU only: never installed on CPU machines or in CI.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
