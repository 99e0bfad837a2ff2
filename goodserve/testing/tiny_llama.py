"""A tiny random-weight Llama built at test time, so vLLM tests need no weights download.

The model is deterministic (fixed seed) and cached on disk keyed by its config, so a test
session builds it once (about a second) and later sessions reuse it. Weights are drawn with
a larger init scale than Llama's default so greedy argmax has clear margins: with the
default 0.02 the logits are almost flat and float noise between prefill and decode kernels
could flip a token, which would make "identical greedy output" tests flaky for no real bug.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
"""2 layers, hidden 256, 4 heads (head dim 64), vocab 1024, MLP 512."""

TINY_LLAMA_SEED = 1234


def default_cache_dir() -> Path:
    """Where built models live: $GOODSERVE_CACHE_DIR, else ~/.cache/goodserve."""
    root = os.environ.get("GOODSERVE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "goodserve"
    )
    return Path(root) / "models"


def _config_key(config: dict[str, Any], seed: int) -> str:
    blob = json.dumps({"config": config, "seed": seed}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def build_tiny_llama(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = TINY_LLAMA_SEED,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Build (or reuse) the tiny Llama; return the directory with config + safetensors.

    Safe against concurrent builders: the model is written to a temporary directory and
    renamed into place.
    """
    config_dict = {**TINY_LLAMA_CONFIG, **(overrides or {})}
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = base / f"tiny-llama-{_config_key(config_dict, seed)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{target.name}.tmp-{os.getpid()}"
    torch.manual_seed(seed)
    hf_keys = {k: v for k, v in config_dict.items() if k not in ("architectures", "torch_dtype")}
    config = LlamaConfig(**hf_keys)
    config.architectures = list(config_dict["architectures"])
    with torch.no_grad():
        model = LlamaForCausalLM(config)
        model.float()
        model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True)
    # Record how it was made (transformers may rewrite the dtype key; keep ours explicit).
    cfg_path = tmp / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["torch_dtype"] = config_dict["torch_dtype"]
    saved["goodserve_seed"] = seed
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process won the race; ours is identical, drop it.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(build_tiny_llama())
