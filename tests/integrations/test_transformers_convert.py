"""random-LTD on Hugging Face layers: kept tokens equal the original layer on the subsequence, dropped ones pass
through, eval/generate are the unconverted model's, hidden states keep the full length, bad setups raise."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
)

from random_ltd.config import ConfigError, RandomLTDConfig  # noqa: E402
from random_ltd.integrations.transformers import HFRandomLTDLayer, convert  # noqa: E402
from random_ltd.layers import RandomLTDLayer, get_random_ltd_state, unwrap_random_ltd  # noqa: E402

B, S, KEEP, VOCAB = 3, 12, 5, 61
#: the per-layer KV-cache argument under each name transformers releases have used (5.24+: ``cache``)
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def block(layers: int = 4) -> dict:
    return {"enabled": True, "total_layer_num": layers,
            "random_ltd_schedule": {"min_value": 4, "max_value": 64,
                                    "schedule_config": {"require_steps": 10, "seq_per_step": 4}}}


def make(arch: str, impl: str = "sdpa"):
    """(model, layers ModuleList, inputs) for a tiny random-init model without dropout."""
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = impl
        model = GPT2LMHeadModel(cfg)
        return model, model.transformer.h, {"input_ids": torch.randint(1, VOCAB, (B, S))}
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        cfg._attn_implementation = impl
        model = LlamaForCausalLM(cfg)
        return model, model.model.layers, {"input_ids": torch.randint(1, VOCAB, (B, S))}
    if arch in ("bert", "roberta"):
        cls_cfg, cls = (BertConfig, BertModel) if arch == "bert" else (RobertaConfig, RobertaModel)
        cfg = cls_cfg(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                      vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=64, pad_token_id=0)
        cfg._attn_implementation = impl
        model = cls(cfg)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, 9:] = 0  # padding: a 4-D mask reaches the layers
        return model, model.encoder.layer, {"input_ids": torch.randint(3, VOCAB, (B, S)), "attention_mask": mask}
    if arch == "vit":
        cfg = ViTConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        image_size=8, patch_size=2, num_channels=1, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=10)
        cfg._attn_implementation = impl
        model = ViTForImageClassification(cfg)
        return model, model.vit.layers, {"pixel_values": torch.randn(B, 1, 8, 8)}
    raise ValueError(arch)


ARCHS = ["gpt2", "llama", "bert", "roberta", "vit"]


def reference_mask(mask, idx_row, i):
    """Plain indexing: sample i's mask restricted to its kept tokens (every form the layers receive)."""
    if mask is None:
        return None
    m = mask[i % mask.shape[0]:i % mask.shape[0] + 1]
    if m.dim() == 2:
        return m[:, idx_row]
    if m.shape[2] == 1:
        return m[..., idx_row]
    return m[:, :, idx_row][:, :, :, idx_row]


def run_capturing(model, layer, inputs):
    """Run the model in training mode and capture the wrapped layer's call (args, kwargs, output)."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen.update(args=args, kwargs=kwargs, out=out)

    h = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        model.train()
        model(**inputs)
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kept_tokens_equal_original_layer_on_subsequence(arch, impl):
    model, layers, inputs = make(arch, impl)
    ref = copy.deepcopy(layers[1])
    state = convert(model, block())
    state.advance(0, {1: KEEP, 2: KEEP})
    seen = run_capturing(model, layers[1], inputs)
    x = seen["args"][0]
    out = seen["out"] if isinstance(seen["out"], torch.Tensor) else seen["out"][0]
    s = x.shape[1]
    assert out.shape == x.shape
    idx = state.indices(1, x.shape[0], s, KEEP, x.device)
    kwargs = dict(seen["kwargs"])
    args = list(seen["args"])
    mask_pos = {"gpt2": 2, "bert": 1, "roberta": 1, "vit": 1}.get(arch)
    mask = kwargs.pop("attention_mask", None)
    if mask is None and mask_pos is not None and len(args) > mask_pos:
        mask = args[mask_pos]
        args[mask_pos] = None
    for i in range(x.shape[0]):
        keep = idx[i]
        dropped = torch.ones(s, dtype=torch.bool)
        dropped[keep] = False
        assert torch.equal(out[i, dropped], x[i, dropped]), "dropped tokens must pass through unchanged"
        kw = dict(kwargs)
        sub_mask = reference_mask(mask, keep, i)
        if "position_ids" in kw and kw["position_ids"] is not None:
            kw["position_ids"] = kw["position_ids"][i % kw["position_ids"].shape[0]][keep][None]
        if "position_embeddings" in kw:  # Llama rotary: the kept tokens' original positions
            kw["position_embeddings"] = tuple(t[i % t.shape[0]][keep][None] for t in kw["position_embeddings"])
        for name in CACHE_KWARGS:
            kw.pop(name, None)  # no cache for the reference (the model passes one under its release's name)
        a = [x[i:i + 1, keep], *args[1:]]
        if arch == "gpt2":
            a[1] = None  # no cache for the reference
        if mask_pos is not None and len(a) > mask_pos:
            a[mask_pos] = sub_mask
        else:
            kw["attention_mask"] = sub_mask
        if arch == "llama" and sub_mask is None:
            kw["attention_mask"] = None  # SDPA is_causal on the k x k subsequence
        expected = ref.train()(*a, **kw)
        expected = expected if isinstance(expected, torch.Tensor) else expected[0]
        torch.testing.assert_close(out[i:i + 1, keep], expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out[:, idx[0]], x[:, idx[0]])


def test_llama_explicit_causal_mask_equals_none_mask_on_kept_tokens():
    """A None causal mask on k kept tokens (SDPA is_causal) equals an explicit k x k causal mask."""
    model, layers, inputs = make("llama")
    state = convert(model, block())
    state.advance(0, {1: KEEP, 2: KEEP})
    seen = run_capturing(model, layers[1], inputs)
    assert seen["kwargs"]["attention_mask"] is None
    x = seen["args"][0]
    idx = state.indices(1, B, S, KEEP, x.device)
    kw = {k: v for k, v in seen["kwargs"].items() if k not in CACHE_KWARGS}
    kw["position_embeddings"] = tuple(t.expand(B, -1, -1)[torch.arange(B)[:, None], idx]
                                      for t in kw["position_embeddings"])
    kw["position_ids"] = kw["position_ids"].expand(B, -1).gather(1, idx)
    causal = torch.ones(KEEP, KEEP, dtype=torch.bool).tril()[None, None].expand(B, 1, KEEP, KEEP)
    orig = type(layers[1]).__mro__[3]
    expected = orig.forward(layers[1], x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])),
                            **{**kw, "attention_mask": causal})
    got = seen["out"].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_bitwise_and_hidden_states_full_length(arch):
    base, _, inputs = make(arch)
    model = copy.deepcopy(base)
    state = convert(model, block())
    state.advance(0, {1: KEEP, 2: KEEP})
    base.eval(), model.eval()
    a = model(**inputs, output_hidden_states=True)
    b = base(**inputs, output_hidden_states=True)
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    model.train()
    out = model(**inputs, output_hidden_states=True)
    shapes = {tuple(h.shape) for h in out.hidden_states}
    assert len(out.hidden_states) == 5 and len(shapes) == 1, shapes
    assert not torch.equal(out.hidden_states[2], a.hidden_states[2])  # dropping did happen
    with torch.no_grad():  # a train-mode forward without autograd drops nothing (as generate())
        assert torch.equal(model(**inputs)[0], base.train()(**inputs)[0])


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_identical_tokens_with_kv_cache(arch, train_mode):
    base, _, inputs = make(arch)
    model = copy.deepcopy(base)
    state = convert(model, block())
    state.advance(0, {1: KEEP, 2: KEEP})
    prompt = inputs["input_ids"][:, :6]
    base.eval()
    model.train(train_mode)
    expected = base.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    assert got.shape[1] == 14


def test_two_d_and_extended_padding_masks_are_sliced():
    """The flash-attention [b, s] form and the 4.x [b, 1, 1, s] additive form reach the layer sliced."""
    model, layers, _ = make("bert", "eager")
    state = convert(model, block())
    state.advance(0, {1: KEEP})
    layer = layers[1].train()
    x = torch.randn(B, S, 32)
    ext = torch.zeros(B, 1, 1, S)
    ext[0, ..., 9:] = torch.finfo(torch.float32).min
    state.begin_micro_batch()
    out = layer(x, ext)
    idx = state.indices(1, B, S, KEEP, x.device)
    orig = type(layer).__mro__[3]
    for i in range(B):
        expected = orig.forward(layer, x[i:i + 1, idx[i]], ext[i:i + 1, ..., idx[i]])
        torch.testing.assert_close(out[i:i + 1, idx[i]], expected, rtol=1e-5, atol=1e-5)
    received = {}
    h = layer.attention.register_forward_pre_hook(
        lambda m, a, k: received.setdefault("mask", a[1] if len(a) > 1 else k.get("attention_mask")),
        with_kwargs=True)
    two_d = torch.ones(B, S, dtype=torch.long)
    two_d[1, :4] = 0
    try:
        layer(x, two_d)
    except RuntimeError:
        pass  # eager attention cannot add a 2-D mask; we only check what it was given
    h.remove()
    assert torch.equal(received["mask"], two_d.gather(1, idx))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(reentrant):
    base, _, inputs = make("gpt2")
    plain = copy.deepcopy(base)
    ckpt = copy.deepcopy(base)
    grads = []
    for model, gc in ((plain, False), (ckpt, True)):
        state = convert(model, block())
        state.advance(0, {1: KEEP, 2: KEEP})
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_isinstance_and_unwrap():
    base, layers, inputs = make("gpt2")
    keys = list(base.state_dict())
    state = convert(base, block())
    assert list(base.state_dict()) == keys
    assert isinstance(layers[1], HFRandomLTDLayer) and type(layers[1]).__mro__[3].__name__ == "GPT2Block"
    assert not isinstance(layers[0], RandomLTDLayer) and not isinstance(layers[3], RandomLTDLayer)
    assert get_random_ltd_state(base) is state
    unwrap_random_ltd(base)
    assert type(layers[1]).__name__ == "GPT2Block"


def test_config_forms_and_disabled_block(tmp_path):
    import json

    ds = {"train_batch_size": 4, "data_efficiency": {"enabled": True, "data_routing": {
        "enabled": True, "random_ltd": block()}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    for cfg in (ds, str(path), block(), RandomLTDConfig.model_validate(block())):
        model, layers, _ = make("gpt2")
        state = convert(model, cfg)
        assert state.enabled and isinstance(layers[2], HFRandomLTDLayer)
    model, layers, inputs = make("gpt2")
    base = copy.deepcopy(model)
    state = convert(model, {**block(), "enabled": False})
    state.advance(0, {1: KEEP, 2: KEEP})
    model.train(), base.train()
    assert torch.equal(model(**inputs)[0], base(**inputs)[0])


def test_errors():
    model, layers, inputs = make("gpt2")
    with pytest.raises(ConfigError, match="hidden_state_order"):
        convert(model, {**block(), "hidden_state_order": "seq_batch_dim"})
    with pytest.raises(ConfigError, match="total_layer_num"):
        convert(model, {**block(6)})
    with pytest.raises(TypeError, match="config"):
        convert(model, None)
    other = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)]))
    with pytest.raises(ValueError, match="not a supported transformers layer"):
        convert(other, block())

    state = convert(model, block())
    state.advance(0, {1: KEEP, 2: KEEP})
    layer = layers[1].train()
    x = torch.randn(B, S, 32)
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device="cpu")
    with pytest.raises(TypeError, match="BlockMask"):
        layer(x, None, bm)
    cache = DynamicCache(config=model.config)
    model.eval()
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    model.train()
    with pytest.raises(ValueError, match="filled KV cache"):
        model(input_ids=inputs["input_ids"][:, :4], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="query rows"):
        layer(x, None, torch.ones(B, 1, S, S + 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed"):
        layer(x, cu_seq_lens_q=torch.tensor([0, S]))

    cross = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, add_cross_attention=True,
                       bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cross)
    convert(m, block()).advance(0, {1: KEEP, 2: KEEP})
    m.train()
    with pytest.raises(NotImplementedError, match="cross-attention"):
        m(input_ids=inputs["input_ids"], encoder_hidden_states=torch.randn(B, 7, 32))


def test_flash_attention_checks():
    """Flash-attention paths raise before compute for packed rows and sliding windows (no flash kernels needed)."""
    from types import SimpleNamespace

    model, layers, _ = make("llama")
    state = convert(model, block())
    state.advance(0, {1: KEEP})
    layer = layers[1].train()
    layer.random_ltd_options.model_config = SimpleNamespace(_attn_implementation="flash_attention_2")
    x = torch.randn(1, S, 32)
    cos_sin = (torch.randn(1, S, 8), torch.randn(1, S, 8))
    packed = torch.cat([torch.arange(7), torch.arange(S - 7)])[None]
    with pytest.raises(ValueError, match="packed sequences"):
        layer(x, attention_mask=None, position_ids=packed, position_embeddings=cos_sin)
    layer.random_ltd_options.sliding_window = 4
    with pytest.raises(NotImplementedError, match="sliding_window=4"):
        layer(x, attention_mask=None, position_ids=torch.arange(S)[None], position_embeddings=cos_sin)


def test_tuple_outputs_as_in_transformers_4():
    """4.x layers return tuples (hidden, present, attentions): the first element is scattered, the rest kept."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    class TupleBlock(GPT2Block):
        def forward(self, hidden_states, layer_past=None, attention_mask=None, **kwargs):
            return (super().forward(hidden_states, None, attention_mask), "present", "attn")

    model, layers, _ = make("gpt2")
    for layer in layers:
        layer.__class__ = TupleBlock
    state = convert(model, block(), layers=TupleBlock)
    state.advance(0, {1: KEEP})
    layer = layers[1].train()
    x = torch.randn(B, S, 32)
    state.begin_micro_batch()
    out = layer(x)
    assert isinstance(out, tuple) and out[1:] == ("present", "attn") and out[0].shape == x.shape
    idx = state.indices(1, B, S, KEEP, x.device)
    for i in range(B):
        expected = GPT2Block.forward(layer, x[i:i + 1, idx[i]])
        torch.testing.assert_close(out[0][i:i + 1, idx[i]], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="filled KV cache"):
        layer(x, (torch.zeros(B, 4, 3, 8), torch.zeros(B, 4, 3, 8)))
