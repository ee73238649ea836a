"""GGUF for real: ``homefire.convert.convert(..., "gguf-*")`` on the offline tiny Llama, then the llama.cpp
engine serving the files, checked against transformers running the original safetensors.

What a user would see: the same greedy text as transformers at f32, the same log-probabilities, a perplexity
that quantization moves only a little, the same tokens for text and chat, stop strings, n, seeds, abandoned
requests giving their slot back, JSON that follows a schema, and refusals that name the problem.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from homefire.convert import convert
from homefire.errors import AdapterNotFound, ConfigError, InvalidRequest
from homefire.registry import Registry
from homefire.serve.config import model_config
from homefire.serve.engines.protocol import SamplingSpec

pytestmark = pytest.mark.integration

#: Held-out text (written for this test, not in the tokenizer's or model's training data).
HELD_OUT = (
    "On the first cold morning of the season the ferry left the harbour late, because the crew had spent an hour "
    "chipping ice from the ramps and arguing about whether the old diesel would start at all. It did, eventually, "
    "with a cough of blue smoke that drifted over the fish market and made the gulls complain. Passengers stood "
    "along the rail with paper cups of coffee, watching the town shrink behind them: the church with its green "
    "copper roof, the row of painted warehouses, the lighthouse that nobody had lit for twenty years. Halfway "
    "across the strait the wind turned, and the captain announced, in a voice that suggested he had made the same "
    "speech many times before, that the crossing would take a little longer than planned. Nobody minded much. A "
    "child counted seals on a sandbank, an old man explained the tides to anyone who would listen, and a woman in "
    "a yellow coat sketched the islands in a notebook, erasing each outline twice before she was satisfied."
)
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Which ferry leaves first?"},
]


def run(loop: asyncio.AbstractEventLoop, coro):
    return loop.run_until_complete(coro)


async def collect(engine, prompt: list[int], sampling: SamplingSpec) -> tuple[dict[int, str], dict[int, str], int]:
    """(text per choice, finish reason per choice, completion tokens)."""
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    tokens = 0
    async for d in engine.generate("req", prompt, sampling):
        text[d.index] = text.get(d.index, "") + d.text
        tokens += d.num_tokens
        if d.finish_reason is not None:
            finish[d.index] = d.finish_reason
    return text, finish, tokens


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def entries(tiny_model_ref):
    """The tiny model converted to every GGUF target (a fraction of a second each)."""
    return {to: convert(tiny_model_ref, to) for to in ("gguf-f32", "gguf-q8_0", "gguf-q4_0", "gguf-f16")}


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    """transformers on the original safetensors, fp32: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_path)


def _engine(loop, entry, slots: int = 1):
    from homefire.serve.engines import engine_class

    cfg = model_config({"name": "tiny-gguf", "source": entry.ref, "engine": "llamacpp", "threads": 2, "slots": slots})
    engine = engine_class("llamacpp")(cfg, entry.path)
    run(loop, engine.start(60))
    return engine


@pytest.fixture(scope="module")
def engines(loop, entries):
    made = {"f32": _engine(loop, entries["gguf-f32"], slots=2), "f32-1": _engine(loop, entries["gguf-f32"], slots=1),
            "q8_0": _engine(loop, entries["gguf-q8_0"]), "q4_0": _engine(loop, entries["gguf-q4_0"])}
    yield made
    for engine in made.values():
        run(loop, engine.shutdown())


def _hf_logprobs(hf, ids: list[int]) -> list[float]:
    import torch

    model, _ = hf
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _ppl(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


# -- conversion ----------------------------------------------------------------------------------------------------


def test_entries_record_format_lineage_and_fallbacks(entries):
    import gguf

    base = Registry().get("demo-tiny")
    expected = {"gguf-f32": ("converted", "F32"), "gguf-f16": ("converted", "F16"),
                "gguf-q8_0": ("quantized", "Q8_0"), "gguf-q4_0": ("quantized", "Q4_0")}
    for to, (kind, qtype) in expected.items():
        e = entries[to]
        assert (e.format, e.kind, e.parent) == ("gguf", kind, base.ref)
        recipe = e.config["recipe"]
        assert recipe["to"] == to and recipe["source"] == base.ref and recipe["quant"] == qtype.lower()
        # ffn_down rows are intermediate_size = 344 long: not whole 32-blocks, so kept at f16 when quantizing.
        blocked = qtype.startswith("Q")
        assert recipe["fallback_tensors"] == (["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"] if blocked else [])
        assert list(e.files) == ["model.gguf"]
        assert e.metrics["size_bytes"] == (Path(e.path) / "model.gguf").stat().st_size

        reader = gguf.GGUFReader(Path(e.path) / "model.gguf")
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert len(types) == 2 + 2 * 9 + 1  # token_embd, output_norm, output + 9 per block
        assert types["blk.0.attn_q.weight"] == qtype and types["output.weight"] == qtype
        assert types["blk.1.ffn_down.weight"] == ("F16" if blocked else qtype)
        assert types["blk.0.attn_norm.weight"] == "F32"
        field = reader.get_field("llama.feed_forward_length")
        assert field.contents() == 344
        assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    sizes = {to: entries[to].metrics["size_bytes"] for to in expected}
    assert sizes["gguf-f32"] > sizes["gguf-f16"] > sizes["gguf-q8_0"] > sizes["gguf-q4_0"]


def _fake_model(tmp_path: Path, name: str, **config) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_check_refuses_what_it_cannot_write(tmp_path, tiny_model_path):
    registry = Registry()
    gpt2 = _fake_model(tmp_path, "gpt2ish", architectures=["GPT2LMHeadModel"], hidden_size=128)
    with pytest.raises(ConfigError, match=r"architecture GPT2LMHeadModel is not handled.*Fix"):
        convert(str(gpt2), "gguf-q8_0")
    odd = _fake_model(tmp_path, "odd", architectures=["LlamaForCausalLM"], hidden_size=100, num_attention_heads=2)
    with pytest.raises(ConfigError, match=r"hidden_size 100 is not a multiple of the q4_0 block size 32.*gguf-f16"):
        convert(str(odd), "gguf-q4_0")

    # A SentencePiece-style tokenizer is not the byte-level BPE this converter writes.
    sp = tmp_path / "spm"
    sp.mkdir()
    for f in Path(tiny_model_path).iterdir():
        (sp / f.name).write_bytes(f.read_bytes())
    tok = json.loads((sp / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (sp / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"not a plain GPT-2 style byte-level BPE.*Metaspace"):
        convert(str(sp), "gguf-f32")
    for name in ("gpt2ish-gguf-q8_0", "odd-gguf-q4_0", "spm-gguf-f32"):
        assert registry.versions(name) == []


# -- the engine against transformers ----------------------------------------------------------------------------------


def test_greedy_text_equals_transformers(loop, engines, hf):
    import torch

    model, tok = hf
    engine = engines["f32"]
    prompt = engine.tokenizer.render_chat(CHAT)
    new = 40
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    expected = tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)
    spec = SamplingSpec(max_tokens=new, temperature=0.0, ignore_eos=True)
    text, finish, tokens = run(loop, collect(engine, prompt, spec))
    assert (text[0], finish[0], tokens) == (expected, "length", new)
    assert len(expected) > 40


def test_score_equals_transformers_logprobs(loop, engines, hf):
    ids = engines["f32"].tokenizer.encode(HELD_OUT)
    assert 200 < len(ids) < 512
    scores = run(loop, engines["f32"].score(ids, top_k=5))
    got, want = scores.logprobs, _hf_logprobs(hf, ids)
    assert len(got) == len(want) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(got, want)) < 2e-3
    assert abs(_ppl(got) / _ppl(want) - 1) < 1e-3
    # the top tokens at each position: 5 of them, the most likely first among them, as transformers ranks them
    import torch

    with torch.no_grad():
        top = torch.log_softmax(hf[0](torch.tensor([ids])).logits[0, :-1].double(), -1).topk(5)
    assert len(scores.top) == len(got) and all(len(t) == 5 for t in scores.top)
    argmax = [max(t, key=t.get) for t in scores.top]
    assert sum(a == b for a, b in zip(argmax, top.indices[:, 0].tolist())) >= 0.99 * len(argmax)
    assert max(abs(t[i] - v) for t, i, v in zip(scores.top, top.indices[:, 0].tolist(), top.values[:, 0].tolist())
               if i in t) < 2e-3


#: Measured on demo-tiny (random init, 397 held-out tokens): perplexity ratio to fp32 transformers 0.9997 (q8_0) and
#: 1.018 (q4_0); mean |log-prob drift| 0.02 and 0.30 nats. Bounds leave room for other CPUs' kernels, no more.
QUANT_BOUNDS = {"q8_0": (1.005, 0.05), "q4_0": (1.06, 0.6)}


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_perplexity_stays_close(loop, engines, hf, quant):
    ids = engines["f32"].tokenizer.encode(HELD_OUT)
    reference = _hf_logprobs(hf, ids)
    quantized = run(loop, engines[quant].score(ids)).logprobs
    ratio = _ppl(quantized) / _ppl(reference)
    drift = sum(abs(a - b) for a, b in zip(quantized, reference)) / len(reference)
    print(f"{quant}: perplexity {_ppl(quantized):.2f} vs fp32 transformers {_ppl(reference):.2f} "
          f"(ratio {ratio:.4f}), mean |drift| {drift:.4f} nats")
    ratio_bound, drift_bound = QUANT_BOUNDS[quant]
    assert 1 / ratio_bound < ratio < ratio_bound
    assert 0 < drift < drift_bound  # quantization moves every log-probability a little, never not at all


def test_q4_0_loses_more_than_q8_0(loop, engines, hf):
    ids = engines["f32"].tokenizer.encode(HELD_OUT)
    reference = _hf_logprobs(hf, ids)
    drift = {
        q: sum(abs(a - b) for a, b in zip(run(loop, engines[q].score(ids)).logprobs, reference)) for q in ("q8_0", "q4_0")
    }
    assert drift["q4_0"] > 3 * drift["q8_0"]


def test_tokenizer_and_chat_equal_hugging_face(engines, tiny_model_path):
    from homefire.serve.engines.text import HFTokenizer

    gguf_tok, hf_tok = engines["f32"].tokenizer, HFTokenizer(tiny_model_path)
    assert gguf_tok.vocab_size == hf_tok.vocab_size == 2048
    texts = [HELD_OUT, "def f(x):\n    return x ** 2  # squares\n\n\n", "  leading and   inner   spaces ",
             "Ünïcödé — “quotes”, emoji 🔥 and 中文", "special <|user|> text<|end|>", "123456789 3.14159",
             "a ,b . c ' d 's", ""]
    for text in texts:
        ids = gguf_tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert gguf_tok.decode(ids) == hf_tok.decode(ids)
    conversations = [
        CHAT,
        [{"role": "user", "content": [{"type": "text", "text": "multi "}, {"type": "text", "text": "part"}]},
         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again?"}],
    ]
    for messages in conversations:
        assert gguf_tok.render_chat(messages) == hf_tok.render_chat(messages)
    assert gguf_tok.render_chat(CHAT)[0] == 1  # <|bos|> from the template's bos_token
    with pytest.raises(InvalidRequest, match="chat template rejected") as err:
        gguf_tok.render_chat([{"role": "user", "content": 5}])  # neither a string nor a list of parts
    assert err.value.param == "messages"


def test_gguf_without_chat_template_refuses_chat(loop, tmp_path, tiny_model_path):
    bare = tmp_path / "no-template"
    bare.mkdir()
    for f in Path(tiny_model_path).iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).write_bytes(f.read_bytes())
    engine = _engine(loop, convert(str(bare), "gguf-f16"))
    try:
        assert engine.tokenizer.chat_template is None
        with pytest.raises(InvalidRequest, match="no chat template.*/v1/completions") as err:
            engine.tokenizer.render_chat(CHAT)
        assert err.value.param == "messages"
        text, finish, tokens = run(loop, collect(engine, engine.tokenizer.encode("Hello"), SamplingSpec(max_tokens=3)))
        assert tokens >= 1 and finish[0] in ("stop", "length")
    finally:
        run(loop, engine.shutdown())


# -- sampling features ------------------------------------------------------------------------------------------------


def test_stop_string_ends_text_before_it(loop, engines):
    engine = engines["f32"]
    prompt = engine.tokenizer.encode("The ferry left the harbour")
    greedy = SamplingSpec(max_tokens=30, temperature=0.0, ignore_eos=True)
    full, _, _ = run(loop, collect(engine, prompt, greedy))
    stop = full[0][len(full[0]) // 2 :][:3]
    assert stop.strip(), full
    cut, finish, tokens = run(loop, collect(engine, prompt, SamplingSpec(**{**greedy.__dict__, "stop": [stop]})))
    assert cut[0] == full[0][: full[0].index(stop)] and finish[0] == "stop" and tokens < 30


def test_concurrent_requests_use_both_slots_and_agree(loop, engines):
    engine = engines["f32"]
    prompts = [engine.tokenizer.encode(t) for t in ("The church with its green roof", "A child counted seals")]
    spec = SamplingSpec(max_tokens=48, temperature=0.0, ignore_eos=True)
    alone = [run(loop, collect(engine, p, spec))[0] for p in prompts]

    async def together():
        busy = []

        async def watch():
            while len(busy) < 200:
                busy.append(engine.stats()["slots_free"])
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(collect(engine, p, spec) for p in prompts))
        watcher.cancel()
        return [r[0] for r in results], busy

    both, busy = run(loop, together())
    assert both == alone and 0 in busy  # both slots were lent at once, and the texts did not mix


def test_n_choices_and_seeds(loop, engines):
    engine = engines["f32"]
    prompt = engine.tokenizer.encode("Passengers stood along the rail")
    spec = SamplingSpec(max_tokens=16, n=2, temperature=1.0, top_p=0.95, top_k=50, seed=7, min_tokens=16)
    first, finish, tokens = run(loop, collect(engine, prompt, spec))
    again, _, _ = run(loop, collect(engine, prompt, spec))
    other, _, _ = run(loop, collect(engine, prompt, SamplingSpec(**{**spec.__dict__, "seed": 8})))
    assert set(first) == {0, 1} and finish == {0: "length", 1: "length"} and tokens == 32
    assert first == again  # same seed, same text
    assert first[0] != first[1] and other != first


def _hf_greedy_with_penalties(hf, prompt: list[int], new: int, repetition: float, frequency: float, presence: float):
    """transformers' greedy text under vLLM's penalty semantics: repetition over prompt and output (HF's own
    processor), then frequency and presence over the output only."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    class OutputPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            counts = torch.bincount(input_ids[0, len(prompt):], minlength=scores.shape[-1])[: scores.shape[-1]]
            return scores - frequency * counts - presence * (counts > 0).float()

    model, tok = hf
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(repetition), OutputPenalties()])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             logits_processor=processors)
    return tok.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize(
    "repetition, frequency, presence", [(1.3, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, 2.0), (1.2, 0.5, 0.5)]
)
def test_penalties_match_vllm_semantics(loop, engines, hf, repetition, frequency, presence):
    engine = engines["f32"]
    # A prompt on which the random model repeats itself ("mod mod mod ..."), so every penalty has work to do.
    prompt = engine.tokenizer.render_chat(CHAT)
    greedy = SamplingSpec(max_tokens=32, temperature=0.0, ignore_eos=True)
    plain, _, _ = run(loop, collect(engine, prompt, greedy))
    spec = SamplingSpec(**{**greedy.__dict__, "repetition_penalty": repetition, "frequency_penalty": frequency,
                           "presence_penalty": presence})
    penalised, _, _ = run(loop, collect(engine, prompt, spec))
    assert penalised[0] == _hf_greedy_with_penalties(hf, prompt, 32, repetition, frequency, presence)
    assert penalised != plain


def test_end_of_sequence_min_tokens_and_ignore_eos(loop, tmp_path, tiny_model_path, hf):
    """A copy of the model whose output head makes <|end|> the greedy first token of the chat reply."""
    import torch
    from safetensors.numpy import load_file, save_file

    model, tok = hf
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    first = int(logits.argmax())
    assert logits[first] > 0  # so the end token's logit, 3x the winner's, beats it
    ending = tmp_path / "ends-at-once"
    ending.mkdir()
    for f in Path(tiny_model_path).iterdir():
        if f.name != "model.safetensors":
            (ending / f.name).write_bytes(f.read_bytes())
    weights = load_file(Path(tiny_model_path) / "model.safetensors")
    head = weights["lm_head.weight"].copy()
    head[tok.eos_token_id] = 3 * head[first]
    weights["lm_head.weight"] = head
    save_file(weights, ending / "model.safetensors", metadata={"format": "pt"})
    engine = _engine(loop, convert(str(ending), "gguf-f32"))
    try:
        greedy = SamplingSpec(max_tokens=40, temperature=0.0)
        text, finish, tokens = run(loop, collect(engine, prompt_ids, greedy))
        assert (text[0], finish[0], tokens) == ("", "stop", 1)  # <|end|> counts as a token, never as text
        at_least = SamplingSpec(**{**greedy.__dict__, "min_tokens": 6})
        text, finish, tokens = run(loop, collect(engine, prompt_ids, at_least))
        assert tokens >= 6 and text[0]
        endless = SamplingSpec(**{**greedy.__dict__, "ignore_eos": True})
        text, finish, tokens = run(loop, collect(engine, prompt_ids, endless))
        assert (finish[0], tokens) == ("length", 40)
    finally:
        run(loop, engine.shutdown())


def test_abandoned_request_frees_its_slot_within_a_token(loop, engines):
    engine = engines["f32-1"]
    prompt = engine.tokenizer.encode("The crossing would take a little longer")

    async def abandon() -> tuple[int, int]:
        stream = engine.generate("gone", prompt, SamplingSpec(max_tokens=400, temperature=0.0, ignore_eos=True))
        got = 0
        async for d in stream:
            got += d.num_tokens
            if got >= 3:
                break
        assert engine.stats()["slots_free"] == 0  # still decoding: the worker runs ahead of the reader
        decoded = engine._slots[0].n_tokens  # tokens in the slot's context when the client goes
        await stream.aclose()
        deadline = time.monotonic() + 5
        while engine.stats()["slots_free"] < 1:
            assert time.monotonic() < deadline, engine.stats()
            await asyncio.sleep(0.001)
        return decoded, engine._slots[0].n_tokens

    decoded, final = run(loop, abandon())
    assert engine.stats() == {"unfinished_requests": 0, "slots": 1, "slots_free": 1}
    # The worker stopped at once (a token in flight at most), not 400 tokens later. A token is emitted before it is
    # evaluated into the slot's context, so when the reader holds 3 the context holds the prompt and at least 2.
    assert len(prompt) + 2 <= decoded <= final <= decoded + 2
    text, finish, _ = run(loop, collect(engine, prompt, SamplingSpec(max_tokens=4, temperature=0.0)))
    assert finish[0] in ("stop", "length")


def test_structured_output_follows_the_schema(loop, engines):
    engine = engines["f32"]
    prompt = engine.tokenizer.render_chat([{"role": "user", "content": "Reply in JSON."}])
    for seed in (1, 2, 3):
        text, finish, _ = run(loop, collect(engine, prompt, SamplingSpec(max_tokens=64, seed=seed, json_schema=SCHEMA)))
        value = json.loads(text[0])
        assert finish[0] == "stop" and set(value) == {"ok", "color"}
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
    # Any object: a random model writes long keys, so try a few seeds until one closes its object in time.
    closed = []
    for seed in range(1, 9):
        text, finish, _ = run(loop, collect(engine, prompt, SamplingSpec(max_tokens=64, seed=seed, json_object=True)))
        assert text[0].startswith("{")
        if finish[0] == "stop":
            closed.append(json.loads(text[0]))
            break
    assert closed and isinstance(closed[0], dict)
    with pytest.raises(InvalidRequest) as err:
        run(loop, collect(engine, prompt, SamplingSpec(max_tokens=8, json_schema={"type": "object", "$ref": "#/nope"})))
    assert err.value.param == "response_format"


def test_adapters_are_refused_with_the_field(loop, engines):
    engine = engines["f32"]
    with pytest.raises(InvalidRequest, match="serves no LoRA adapters") as err:
        run(loop, _gen_with_adapter(engine))
    assert err.value.param == "model"
    with pytest.raises(InvalidRequest) as err:
        run(loop, engine.load_adapter("a", "/nowhere"))
    assert err.value.param == "model"
    with pytest.raises(AdapterNotFound):
        run(loop, engine.unload_adapter("a"))
    assert engine.adapters() == [] and engine.adapter_path("a") is None
    run(loop, engine.check_health())


async def _gen_with_adapter(engine):
    async for _ in engine.generate("a", [1, 2, 3], SamplingSpec(max_tokens=2), adapter="sql"):
        pass


def test_openai_layer_over_the_engine(loop, engines):
    """The engine under the OpenAI layer: a JSON-schema chat answer, and a streamed completion cut by a stop."""
    from homefire.serve.protocol import ChatCompletionRequest, CompletionRequest
    from homefire.serve.serving import ACCEPTED, OpenAIServing

    serving = OpenAIServing("tiny-gguf", engines["f32"])

    async def items(gen) -> list:
        return [x async for x in gen]

    chat = ChatCompletionRequest.model_validate({
        "model": "tiny-gguf", "messages": CHAT, "n": 2, "seed": 3, "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    })
    got = run(loop, items(serving.chat(chat)))
    assert got[0] == ACCEPTED
    body = json.loads(got[1])
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        answer = json.loads(choice["message"]["content"])
        assert choice["finish_reason"] == "stop" and set(answer) == {"ok", "color"}

    prompt = "The ferry left the harbour"
    full = CompletionRequest.model_validate(
        {"model": "tiny-gguf", "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
    whole = json.loads(run(loop, items(serving.completion(full)))[1])["choices"][0]["text"]
    stop = whole[8:11]
    streamed = CompletionRequest.model_validate({**full.model_dump(exclude_none=True), "stream": True, "stop": [stop]})
    sse = "".join(x for x in run(loop, items(serving.completion(streamed))) if isinstance(x, str))
    events = [e[6:] for e in sse.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"]]
    assert "".join(c["text"] for c in chunks) == whole[: whole.index(stop)] and chunks[-1]["finish_reason"] == "stop"


def test_start_is_bounded_and_names_the_install(loop, entries, monkeypatch, tmp_path):
    from homefire.errors import EngineStartTimeout
    from homefire.serve.engines.llamacpp import LlamaCppEngine

    cfg = model_config({"name": "tiny-gguf", "source": "x", "engine": "llamacpp", "slots": 4})
    with pytest.raises(EngineStartTimeout, match="did not load model.gguf .4 slot.s.. within 0s"):
        run(loop, LlamaCppEngine(cfg, entries["gguf-f32"].path).start(0))
    with pytest.raises(ConfigError, match=r"holds 2 \.gguf files"):
        (tmp_path / "a.gguf").write_bytes(b"")
        (tmp_path / "b.gguf").write_bytes(b"")
        LlamaCppEngine(cfg, str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(ConfigError, match=r"pip install 'homefire\[llamacpp\]'"):
        run(loop, LlamaCppEngine(cfg, entries["gguf-f32"].path).start(60))
