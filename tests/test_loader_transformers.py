"""A real consumer: a transformers Llama, saved sharded, loaded from S3 with ``load_dir``.

The model is built in the test from a tiny ``LlamaConfig`` (nothing is
downloaded), saved with ``save_pretrained(safe_serialization=True)`` in several
shards with an index, uploaded to the test S3 server, then loaded into a fresh
model with ``load_dir`` + ``load_state_dict(assign=True)`` — with and without an
agent — and must give the same logits as the stock ``from_pretrained``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coldbrew.loader import iter_tensors, load_dir  # noqa: E402


def tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture
def saved(tmp_path, bucket, s3_client):
    model = tiny_llama()
    out = tmp_path / "llama"
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").exists()
    for p in out.iterdir():
        s3_client.put_object(Bucket=bucket, Key=f"llama/{p.name}", Body=p.read_bytes())
    return out, f"s3://{bucket}/llama/"


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def other_model(config):
    """Same architecture, different random weights: only loading makes it match.

    Built in float32 like ``from_pretrained`` builds it: ``assign=True`` then gives
    each parameter the loaded tensor's dtype, and buffers that are not in the
    checkpoint (the rotary ``inv_freq``) stay float32, as they do in the stock model.
    """
    torch.manual_seed(1234)
    return transformers.LlamaForCausalLM(config).eval()


def test_load_dir_feeds_load_state_dict(saved, loader_env, s3, monkeypatch, tmp_path, make_agent, bucket):
    local, uri = saved
    stock = transformers.LlamaForCausalLM.from_pretrained(local, dtype=torch.bfloat16).eval()
    want = logits(stock)

    sd = load_dir(uri, cache_dir=tmp_path / "cache")
    model = other_model(stock.config)
    assert not torch.equal(logits(model), want)
    missing, unexpected = model.load_state_dict(sd, assign=True)
    assert not missing and not unexpected
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    assert set(sd.stats["bytes_by_source"]) == {"origin"}

    # Through an agent, as a vLLM-style weight iterator.
    agent = make_agent(f"s3://{bucket}")
    model = other_model(stock.config)
    sd = dict(iter_tensors(uri, socket=agent.socket, agent=True))
    model.load_state_dict(sd, assign=True)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)


def test_dtype_cast_matches_from_pretrained_dtype(saved, loader_env, s3, monkeypatch, tmp_path):
    local, uri = saved
    stock = transformers.LlamaForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    sd = load_dir(uri, dtype=torch.float32, cache_dir=False)
    model = other_model(stock.config)
    model.load_state_dict(sd, assign=True)
    torch.testing.assert_close(logits(model), logits(stock), rtol=0, atol=0)
