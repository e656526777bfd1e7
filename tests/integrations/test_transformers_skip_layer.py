"""SkipLayer on Hugging Face GPT2Block and LlamaDecoderLayer (random-init tiny configs, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from random_ltd.config import ConfigError  # noqa: E402
from random_ltd.integrations.transformers.skip_layer import (  # noqa: E402
    HFSkipLayer,
    convert_to_skip_layer,
    log_skip_layer_metrics,
)
from random_ltd.layers.skip_layer import SkipLayerOptions, skip_layer_aux_loss  # noqa: E402

V = 100


def gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=V, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


MODELS = [pytest.param(gpt2, id="gpt2"), pytest.param(llama, id="llama")]


def ds(**block):
    return {"train_batch_size": 4, "skip_layer": {"enabled": True, **block}}


def decisive(wrapped):
    for layer in wrapped:
        torch.nn.init.normal_(layer.router.proj.weight, std=2.0)


@pytest.fixture
def padding():
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    return mask


@pytest.mark.parametrize("make", MODELS)
def test_every_token_routed_equals_the_original_model(make, padding):
    torch.manual_seed(0)
    model = make().eval()
    ref = copy.deepcopy(model)
    wrapped = convert_to_skip_layer(model, ds(router="random", capacity=1.0))
    assert len(wrapped) == 3 and all(isinstance(w, HFSkipLayer) for w in wrapped)
    x = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits)
        got, want = model(x, attention_mask=padding).logits, ref(x, attention_mask=padding).logits
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0, 3:], want[0, 3:])
    with torch.no_grad():
        got = model(x, output_hidden_states=True).hidden_states
        want = ref(x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(x, output_attentions=True)
    out = model.generate(x, attention_mask=padding, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref.generate(x, attention_mask=padding, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("make", MODELS)
def test_efficient_equals_dense_loss_and_gradients(make, padding):
    torch.manual_seed(0)
    model = make().train()
    dense = copy.deepcopy(model)
    decisive(convert_to_skip_layer(model, ds(capacity=0.5, group_size=3)))
    decisive(convert_to_skip_layer(dense, ds(capacity=0.5, implementation="dense")))
    dense.load_state_dict(model.state_dict())
    x = torch.randint(0, V, (2, 11))
    grads, losses, decisions = [], [], []
    for m in (model, dense):
        torch.manual_seed(5)  # same router noise
        out = m(x, attention_mask=padding, labels=x)
        loss = out.loss + skip_layer_aux_loss(m)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        decisions.append([w.last_route.hard for w in m.modules() if isinstance(w, HFSkipLayer)])
    for a, b in zip(*decisions):
        assert torch.equal(a, b) and 0 < a.sum() < a.numel()
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and any("router" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("make", MODELS)
def test_skipped_tokens_pass_through_and_cached_greedy_decoding_matches_full_recompute(make):
    torch.manual_seed(0)
    model = make().eval()
    wrapped = convert_to_skip_layer(model, ds(capacity=0.5, layers=[1, 2]))
    assert not any(w.training for w in wrapped)  # an eval-mode model stays in eval mode (no router noise)
    decisive(wrapped)
    x = torch.randint(0, V, (1, 9))
    out = model.generate(x, max_new_tokens=8, do_sample=False)  # KV cache, one routed/skipped step per token
    captured = []
    hook = wrapped[0].register_forward_hook(lambda mod, args, kw, y: captured.append((args, kw, y)), with_kwargs=True)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits  # full recomputation: the router reaches the same argmax decisions
    hook.remove()
    assert torch.equal(logits[:, x.shape[1] - 1:].argmax(-1), out[:, x.shape[1]:])
    args, kw, y = captured[0]
    hidden = args[0] if args else kw["hidden_states"]
    skipped = ~wrapped[0].last_route.routed
    assert 0 < skipped.sum() < skipped.numel()
    assert torch.equal(y[skipped], hidden[skipped])


def test_config_disabled_or_missing_leaves_model_unchanged_and_bad_layers_error():
    model = gpt2()
    before = dict(model.state_dict())
    assert convert_to_skip_layer(model, {"train_batch_size": 1}) == []
    assert convert_to_skip_layer(model, {"skip_layer": {"enabled": False, "capacity": 0.3}}) == []
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(ConfigError, match=r"skip_layer.layers: layer ids \[5\] outside \[0, 3\)"):
        convert_to_skip_layer(model, ds(layers=[0, 5]))
    with pytest.raises(ConfigError, match="skip_layer.capacity"):
        convert_to_skip_layer(model, ds(capacity=0.0))
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        convert_to_skip_layer(torch.nn.Sequential(torch.nn.Linear(2, 2)), ds())


def test_options_from_config_and_state_dict_names():
    model = llama()
    wrapped = convert_to_skip_layer(model, ds(capacity=0.25, aux_loss_weight=0.3, layers=[0, 2], router="sigmoid"))
    assert [w.options.layer_id for w in wrapped] == [0, 2]
    assert wrapped[0].options == SkipLayerOptions(capacity=0.25, aux_loss_weight=0.3, router="sigmoid", layer_id=0)
    keys = model.state_dict().keys()
    assert "model.layers.0.router.proj.weight" in keys and "model.layers.0.layer.self_attn.q_proj.weight" in keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys  # not wrapped
    with pytest.raises(ValueError, match="already a SkipLayer"):
        convert_to_skip_layer(model, ds(layers=[0]))


class _Monitor:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events.extend(events)


class _Engine:
    def __init__(self, module):
        self.module, self.monitor, self.global_samples = module, _Monitor(), 32


def test_metrics_are_written_through_the_engine_monitor():
    model = gpt2()
    convert_to_skip_layer(model, ds(capacity=0.5))
    model(torch.randint(0, V, (2, 8)))
    engine = _Engine(model)
    metrics = log_skip_layer_metrics(engine)
    names = {name for name, _, _ in engine.monitor.events}
    assert names == {"skip_layer/capacity_layer_0", "skip_layer/capacity_layer_1", "skip_layer/capacity_layer_2",
                     "skip_layer/capacity_mean", "skip_layer/aux_loss"}
    assert all(step == 32 for _, _, step in engine.monitor.events)
    assert all(0.0 <= metrics[f"skip_layer/capacity_layer_{i}"] <= 1.0 for i in range(3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_deepspeed_training_with_skip_layer_block_and_csv_metrics(tmp_path, monkeypatch):
    """Real DeepSpeed (one CPU process, gloo): the same config carries the skip_layer block (DeepSpeed ignores it),
    the aux loss trains the routers, and the metrics land in DeepSpeed's CSV monitor."""
    deepspeed = pytest.importorskip("deepspeed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "skip"},
              "skip_layer": {"enabled": True, "capacity": 0.5, "layers": [1, 2]}}
    torch.manual_seed(0)
    model = gpt2()
    wrapped = convert_to_skip_layer(model, config)
    router_before = wrapped[0].router.proj.weight.detach().clone()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(2):
        x = torch.randint(0, V, (2, 12))
        loss = engine(x, labels=x).loss + skip_layer_aux_loss(engine.module)
        engine.backward(loss)
        engine.step()
        metrics = log_skip_layer_metrics(engine)
    assert not torch.equal(router_before, wrapped[0].router.proj.weight.detach())
    assert set(metrics) == {"skip_layer/capacity_layer_1", "skip_layer/capacity_layer_2", "skip_layer/capacity_mean",
                            "skip_layer/aux_loss"}
    written = {p.name for p in (tmp_path / "skip").rglob("*.csv")}
    assert any("capacity_layer_1" in name for name in written), written
