"""Pruning (``homefire.convert.prune``) on a tiny GQA Llama built at test time.

* Structured pruning (``mlp``, ``heads``, ``layers``) is exact when what it removes contributes nothing: neurons,
  a key/value head group or a whole decoder layer made dead in the source are the ones removed, the pruned model's
  logits equal the source's, and its config and parameter count shrink by exactly that much.
* Unstructured pruning (``magnitude``, ``wanda``, percent or 2:4) zeroes exactly the share or pattern asked for in
  every decoder linear layer, keeps the surviving weights unchanged and leaves embeddings, norms and lm_head alone;
  the masks match ``|W|`` / ``|W| * ||X||`` recomputed here, so wanda does use the calibration activations.
* ``check`` and ``parse`` refuse what cannot be pruned with a ConfigError that names the problem and the fix, and
  ``homefire.convert.target`` maps ``prune-*`` names to a pruned hf target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from homefire.convert import prune, target
from homefire.errors import ConfigError
from homefire.models.build import build_tokenizer

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 96, 3, 4, 2
HEAD_DIM = HIDDEN // HEADS
PER_GROUP = HEADS // KV_HEADS
DEAD_NEURONS = 24  # 25% of 96: prune-mlp-25 keeps int(96 * 0.75) // 8 * 8 = 72
DEAD_GROUP = [1, 0, 1]  # the kv group made dead in each layer
DEAD_LAYER = 1
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UNSTRUCTURED = ("prune-wanda-50", "prune-magnitude-50", "prune-magnitude-2of4", "prune-wanda-2of4")
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
          "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}


def _load(path: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _load(path)(ids).logits


def _variant(base: Path, out: Path, edit) -> Path:
    """A copy of ``base`` (tokenizer included) whose weights ``edit(model)`` changed."""
    shutil.copytree(base, out)
    model = _load(base)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _dead_neurons(layer: int) -> torch.Tensor:
    """A different set of neurons per layer, the same count in each."""
    return torch.randperm(INTERMEDIATE, generator=torch.Generator().manual_seed(100 + layer))[:DEAD_NEURONS]


def _group_cols(group: int) -> slice:
    """The o_proj input columns (= q_proj output rows) of kv group ``group``'s query heads."""
    return slice(group * PER_GROUP * HEAD_DIM, (group + 1) * PER_GROUP * HEAD_DIM)


def _linear_keys(n_layers: int = LAYERS) -> list[str]:
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return [f"model.layers.{i}.{'self_attn' if p in attn else 'mlp'}.{p}.weight"
            for i in range(n_layers) for p in PROJ]


def _config_dir(tmp_path: Path, **overrides) -> Path:
    """A directory holding only a config.json (all ``check`` reads)."""
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **overrides}))
    return tmp_path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tokenizer + random-init fp32 Llama: hidden 64, MLP 96, 3 layers, 4 query heads in 2 kv groups."""
    path = tmp_path_factory.mktemp("prune") / "base"
    build_tokenizer(512, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_range=round(HIDDEN ** -0.5, 4),  # as build_model: enough signal for block influence
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def ids(base) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = "Pruning removes what the model does not need; the rest must compute exactly the same."
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


@pytest.fixture(scope="module")
def sparse(base, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each unstructured target converted once: target -> (out dir, facts)."""
    done = {}
    for name in UNSTRUCTURED:
        out = tmp_path_factory.mktemp(name)
        prune.check(base, name)
        done[name] = out, prune.convert(base, out, name)
    return done


@pytest.fixture(scope="module")
def act_norms(base) -> dict[str, torch.Tensor]:
    """Per decoder linear weight, the L2 norm of each input feature over the calibration windows, recomputed."""
    model = _load(base)
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(_mod, args, _out, key=f"{name}.weight"):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[key] = sq.get(key, 0) + (x * x).sum(0)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for window in prune.calibration_ids(AutoTokenizer.from_pretrained(base)):
            model(torch.tensor([window]))
    for h in hooks:
        h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


# -- structured: exact when what is removed contributes nothing -------------------------------------------------------


def test_mlp_removes_the_dead_neurons_and_keeps_the_logits(base, ids, tmp_path):
    def kill(model):
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight[:, _dead_neurons(i)] = 0

    src = _variant(base, tmp_path / "src", kill)
    prune.check(src, "prune-mlp-25")
    facts = prune.convert(src, tmp_path / "out", "prune-mlp-25")

    assert _load(tmp_path / "out").config.intermediate_size == 72
    torch.testing.assert_close(_logits(tmp_path / "out", ids), _logits(src, ids), atol=1e-5, rtol=0)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for i in range(LAYERS):
        keep = sorted(set(range(INTERMEDIATE)) - set(_dead_neurons(i).tolist()))
        mlp = f"model.layers.{i}.mlp"
        for p in ("gate_proj", "up_proj"):
            assert torch.equal(after[f"{mlp}.{p}.weight"], before[f"{mlp}.{p}.weight"][keep])
        assert torch.equal(after[f"{mlp}.down_proj.weight"], before[f"{mlp}.down_proj.weight"][:, keep])
    assert facts["shape"]["after"]["intermediate"] == 72 and facts["shape"]["before"]["intermediate"] == 96
    assert facts["params_before"] - facts["params"] == LAYERS * DEAD_NEURONS * 3 * HIDDEN
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_heads_removes_the_dead_kv_group_and_keeps_the_logits(base, ids, tmp_path):
    def kill(model):
        for layer, group in zip(model.model.layers, DEAD_GROUP):
            layer.self_attn.o_proj.weight[:, _group_cols(group)] = 0

    src = _variant(base, tmp_path / "src", kill)
    prune.check(src, "prune-heads-50")
    facts = prune.convert(src, tmp_path / "out", "prune-heads-50")

    cfg = _load(tmp_path / "out").config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, HEAD_DIM)
    torch.testing.assert_close(_logits(tmp_path / "out", ids), _logits(src, ids), atol=1e-5, rtol=0)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for i, dead in enumerate(DEAD_GROUP):
        live = 1 - dead
        attn = f"model.layers.{i}.self_attn"
        assert torch.equal(after[f"{attn}.q_proj.weight"], before[f"{attn}.q_proj.weight"][_group_cols(live)])
        kv = slice(live * HEAD_DIM, (live + 1) * HEAD_DIM)
        for p in ("k_proj", "v_proj"):
            assert torch.equal(after[f"{attn}.{p}.weight"], before[f"{attn}.{p}.weight"][kv])
        assert torch.equal(after[f"{attn}.o_proj.weight"], before[f"{attn}.o_proj.weight"][:, _group_cols(live)])
    # per layer: the group's query rows and o_proj columns, its key and value rows
    group_params = 2 * PER_GROUP * HEAD_DIM * HIDDEN + 2 * HEAD_DIM * HIDDEN
    assert facts["params_before"] - facts["params"] == LAYERS * group_params
    assert facts["shape"]["after"]["kv_heads"] == 1 and facts["shape"]["after"]["heads"] == 2


def test_layers_removes_the_identity_layer_and_keeps_the_logits(base, ids, tmp_path):
    def kill(model):
        layer = model.model.layers[DEAD_LAYER]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()

    src = _variant(base, tmp_path / "src", kill)
    prune.check(src, "prune-layers-34")
    facts = prune.convert(src, tmp_path / "out", "prune-layers-34")

    assert facts["kept_layers"] == [i for i in range(LAYERS) if i != DEAD_LAYER]
    assert _load(tmp_path / "out").config.num_hidden_layers == LAYERS - 1
    torch.testing.assert_close(_logits(tmp_path / "out", ids), _logits(src, ids), atol=1e-5, rtol=0)
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for new, old in enumerate(facts["kept_layers"]):
        for key in _linear_keys(1):
            assert torch.equal(after[key.replace("layers.0.", f"layers.{new}.")],
                               before[key.replace("layers.0.", f"layers.{old}.")])
    layer_params = sum(before[k].numel() for k in before if k.startswith(f"model.layers.{DEAD_LAYER}."))
    assert facts["params_before"] - facts["params"] == layer_params


# -- unstructured: the share or pattern asked for, nothing else touched -----------------------------------------------


@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_sparse_keeps_shapes_surviving_weights_and_non_decoder_tensors(base, sparse, name):
    out, facts = sparse[name]
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    linears = set(_linear_keys())
    for key, w in after.items():
        assert w.shape == before[key].shape, key
        if key in linears:
            kept = w != 0
            assert torch.equal(w[kept], before[key][kept]), key  # a mask, not a rescale
        else:  # embeddings, lm_head, norms
            assert torch.equal(w, before[key]), key
    assert facts["sparsity"] == 0.5 and facts["quality_only"] is True
    assert facts["pattern"] == ("2:4" if name.endswith("2of4") else None)


def test_wanda_50_zeroes_half_of_every_row_by_weight_times_activation(sparse, base, act_norms):
    after = load_file(sparse["prune-wanda-50"][0] / "model.safetensors")
    before = load_file(base / "model.safetensors")
    for key in _linear_keys():
        w = after[key]
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), key
        score = before[key].abs().double() * act_norms[key][None, :]
        expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, score.argsort(1)[:, : w.shape[1] // 2], False)
        assert torch.equal(w != 0, expected), key


def test_magnitude_50_zeroes_the_smallest_half_of_each_layer(sparse, base):
    after = load_file(sparse["prune-magnitude-50"][0] / "model.safetensors")
    before = load_file(base / "model.safetensors")
    for key in _linear_keys():
        w, w0 = after[key], before[key].abs()
        assert int((w == 0).sum()) == w.numel() // 2, key
        assert w0[w != 0].min() > w0[w == 0].max(), key


@pytest.mark.parametrize("name", ["prune-magnitude-2of4", "prune-wanda-2of4"])
def test_2of4_keeps_the_two_largest_of_every_four_inputs(sparse, base, act_norms, name):
    after = load_file(sparse[name][0] / "model.safetensors")
    before = load_file(base / "model.safetensors")
    for key in _linear_keys():
        w = after[key]
        groups = (w != 0).reshape(w.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), key
        score = before[key].abs().double()
        if name == "prune-wanda-2of4":
            score = score * act_norms[key][None, :]
        top = score.reshape(w.shape[0], -1, 4).topk(2, dim=-1).indices
        expected = torch.zeros_like(groups).scatter_(-1, top, True)
        assert torch.equal(groups, expected), key


def test_wanda_and_magnitude_masks_differ(sparse):
    magnitude = load_file(sparse["prune-magnitude-2of4"][0] / "model.safetensors")
    wanda = load_file(sparse["prune-wanda-2of4"][0] / "model.safetensors")
    differing = sum(int(((magnitude[k] != 0) != (wanda[k] != 0)).sum()) for k in _linear_keys())
    total = sum(magnitude[k].numel() for k in _linear_keys())
    assert differing > 0.05 * total  # activations reorder a real share of each group


# -- refusals -------------------------------------------------------------------------------------------------------


def test_check_accepts_the_tiny_model(base):
    for name in (*UNSTRUCTURED, "prune-mlp-25", "prune-heads-50", "prune-layers-34"):
        prune.check(base, name)


@pytest.mark.parametrize(("overrides", "name", "needles"), [
    ({"hidden_size": 66, "num_attention_heads": 6, "num_key_value_heads": 6}, "prune-wanda-2of4",
     ["divisible by 4", "hidden_size 66", "heads x head_dim 66", "Fix: prune-wanda-50"]),
    ({"intermediate_size": 98}, "prune-magnitude-2of4", ["intermediate_size 98", "Fix: prune-magnitude-50"]),
    ({"architectures": ["GPT2LMHeadModel"]}, "prune-mlp-25", ["GPT2LMHeadModel", "LlamaForCausalLM", "Fix"]),
    ({}, "prune-heads-25", ["2 key/value head group(s)", "leaves 2", "Fix"]),
    ({"num_key_value_heads": 4}, "prune-heads-25",
     ["3 heads left do not divide hidden_size 64", "Fix: use prune-heads-50 or prune-heads-75"]),
    ({}, "prune-mlp-95", ["intermediate_size 96 would become 0", "Fix"]),
    ({}, "prune-layers-10", ["3 layers", "removes 0", "Fix"]),
    ({}, "prune-layers-90", ["3 layers", "removes 3", "Fix"]),
])
def test_check_refuses_with_the_problem_and_the_fix(tmp_path, overrides, name, needles):
    with pytest.raises(ConfigError) as err:
        prune.check(_config_dir(tmp_path, **overrides), name)
    for needle in needles:
        assert needle in str(err.value)


def test_check_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json.*Fix"):
        prune.check(tmp_path, "prune-wanda-50")


@pytest.mark.parametrize(("name", "needle"), [
    ("prune-foo-3", "is not a pruning target"),
    ("prune-mlp-2of4", "2of4 is a sparsity pattern for magnitude or wanda"),
    ("prune-wanda-0", "must be 1-99"),
    ("prune-wanda-100", "is not a pruning target"),
    ("prune-wanda", "is not a pruning target"),
])
def test_parse_refuses_with_the_fix(name, needle):
    with pytest.raises(ConfigError) as err:
        prune.parse(name)
    assert needle in str(err.value) and "Fix" in str(err.value)


def test_parse_reads_method_and_share():
    assert prune.parse("prune-wanda-50") == prune.PruneSpec("wanda", 0.5)
    assert prune.parse("prune-magnitude-2of4") == prune.PruneSpec("magnitude", None)
    assert prune.parse("prune-layers-25").structured and not prune.parse("prune-wanda-25").structured


def test_target_maps_prune_names_to_a_pruned_hf_entry():
    t = target("prune-mlp-25")
    assert (t.format, t.kind, t.module) == ("hf", "pruned", "prune")
    assert t.about == "25% of MLP neurons removed (smaller, faster)"
    with pytest.raises(ConfigError, match="not a pruning target"):
        target("prune-foo-3")
