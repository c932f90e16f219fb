"""Whole models: quantize tiny Hugging Face models block by block, load them back, evaluate.

Needs torch, transformers and tokenizers (the ``models`` extra); skipped cleanly without them.
Every model is built here from a config with a fixed seed, with a tokenizer trained offline
on a generated corpus (tests/tiny_models.py): nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tiny_models as tm  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import spqr_format  # noqa: E402
from spqr_format.cli import main  # noqa: E402
from spqr_format.errors import BadInputError  # noqa: E402
from spqr_format.models import data, hf  # noqa: E402
from spqr_format.models.evaluate import perplexity  # noqa: E402
from spqr_format.models.loader import load_model  # noqa: E402
from spqr_format.models.pipeline import quantize_model  # noqa: E402
from spqr_format.models.walker import find_blocks, find_linears  # noqa: E402

SAMPLES, SEQ = 4, 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = tm.make_corpus()
    p = d / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    return p


_built: dict = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus):
    def get(family: str, dtype=None):
        key = (family, dtype)
        if key not in _built:
            d = tmp_path_factory.mktemp(f"{family}-model")
            tm.build_model(family, d, corpus.read_text(encoding="utf-8"), dtype=dtype)
            _built[key] = d
        return _built[key]

    return get


def _quantize(mdir, out, corpus, **kw):
    kw.setdefault("preset", "spqr-3bit")
    return quantize_model(mdir, out, calib=str(corpus), samples=SAMPLES, seq_len=SEQ, **kw)


def test_cli_preset_names_match_the_presets():
    from spqr_format.codec.presets import PRESETS
    from spqr_format.models.cli import PRESET_NAMES

    assert tuple(PRESETS) == PRESET_NAMES


FAMILIES = ["llama", "qwen2", "gpt2", "opt", "bert", "llama-tied", "phi3", "gemma2", "gpt_neox",
            "falcon", "bloom", "gptj", "mixtral", "qwen2_moe", "gpt_oss"]  # fmt: skip
# what stays raw inside the blocks besides 1-D tensors: mixture-of-experts routing (routers,
# Qwen2-MoE's shared_expert_gate) and GPT-OSS's expert biases [E, out]
ROUTING = ("gate", "router", "shared_expert_gate")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_load_exact(family, model_dir, corpus, tmp_path):
    mdir = model_dir(family)
    out = tmp_path / "m.spqr"
    res = _quantize(mdir, out, corpus)
    assert not os.path.exists(str(out) + ".partial")

    ref = hf.load_hf_model(str(mdir))
    prefix, blocks = find_blocks(ref)
    layers = {f"{prefix}.{i}.{lay.key}": (i, lay) for i, b in enumerate(blocks)
              for lay in find_linears(b)}  # fmt: skip
    expected_q = {name: lay.transposed for name, (_, lay) in layers.items()}
    assert len(expected_q) == len(blocks) * len(find_linears(blocks[0])) >= 8
    sd = ref.state_dict()
    stacked = {f"{prefix}.{i}.{lay.state_key}": sd[f"{prefix}.{i}.{lay.state_key}"].shape[0]
               for name, (i, lay) in layers.items() if lay.expert is not None}  # fmt: skip
    assert bool(stacked) == (family in ("mixtral", "qwen2_moe", "gpt_oss"))
    with spqr_format.open(out) as f:
        infos = {i.name: i for i in f.infos()}
        for name, info in infos.items():
            assert info.encoding == ("bilevel" if name in expected_q else "raw"), name
            if name.startswith(f"{prefix}.") and name not in expected_q and len(info.shape) > 1:
                assert name.split(".")[-2] in ROUTING or name.endswith("_bias"), name
        assert set(expected_q) <= set(infos)
        assert f.metadata.get("model.stacked", {}) == stacked
        meta = f.metadata
        assert meta["model.architecture"] == tm.ARCH[family]
        assert meta["model.config"]["model_type"] == ref.config.model_type
        assert "tokenizer.json" in meta["model.tokenizer_sha256"]
        cal = meta["calibration.set"]
        assert (cal["samples"], cal["seq_len"], cal["tokens"]) == (SAMPLES, SEQ, SAMPLES * SEQ)
        assert cal["text_tokens"] > SAMPLES * SEQ and cal["name"] == "corpus.txt"
        assert meta["encoder.settings"]["preset"] == "spqr-3bit"
        assert [r["name"] for r in meta["encoder.report"]] == f.names()
        assert sorted(meta["model.transposed"]) == sorted(n for n, t in expected_q.items() if t)
        # The reference: the original model with the dequantized weights put in.
        sd = ref.state_dict()
        for name, (i, lay) in layers.items():
            w = torch.from_numpy(f.decode(name, "float32"))
            dst = sd[f"{prefix}.{i}.{lay.state_key}"]
            (dst if lay.expert is None else dst[lay.expert]).copy_(w.t() if lay.transposed else w)
    assert [r["encoding"] for r in res.reports].count("bilevel") == len(expected_q)

    loaded = load_model(out, mdir)
    got = loaded.state_dict()
    for name, t in ref.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(got[name], t), name
    x = torch.arange(3, 3 + 24).unsqueeze(0) % ref.config.vocab_size
    with torch.no_grad():
        a = ref(input_ids=x).logits
        b = loaded(input_ids=x).logits
    assert torch.equal(a, b)
    if ref.config.tie_word_embeddings:  # still one tensor
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_fp16_model_keeps_its_dtype(model_dir, corpus, tmp_path):
    mdir = model_dir("llama", torch.float16)
    out = tmp_path / "m16.spqr"
    _quantize(mdir, out, corpus, preset="gptq-4bit-g128")
    with spqr_format.open(out) as f:
        assert {i.dtype for i in f.infos()} == {"float16"}
    m = load_model(out)
    assert {p.dtype for p in m.parameters()} == {torch.float16}


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_quantize_lm_head(family, model_dir, corpus, tmp_path):
    out = tmp_path / "head.spqr"
    mdir = model_dir(family)
    _quantize(mdir, out, corpus, preset="rtn-4bit-g128", quantize_lm_head=True)
    with spqr_format.open(out) as f:
        assert f.info("lm_head.weight").encoding == "bilevel"
        assert f.info("model.embed_tokens.weight").encoding == "raw"
        w = f.decode("lm_head.weight", "float32")
        assert f.metadata["model.tied"] == {}
    m = load_model(out)
    assert np.array_equal(m.lm_head.weight.detach().numpy(), w)
    # a tied lm_head is untied: the embeddings keep their original values
    emb = hf.load_hf_model(str(mdir)).model.embed_tokens.weight
    assert torch.equal(m.model.embed_tokens.weight, emb)
    assert not m.config.tie_word_embeddings


def test_resume_is_byte_identical(model_dir, corpus, tmp_path):
    mdir = model_dir("llama")
    full = tmp_path / "full.spqr"
    _quantize(mdir, full, corpus)

    out = tmp_path / "cut.spqr"

    class Interrupted(Exception):
        pass

    def stop_after_block_0(ev):
        if ev["kind"] == "block_done" and ev["block"] == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        _quantize(mdir, out, corpus, progress=stop_after_block_0)
    partial = str(out) + ".partial"
    assert not out.exists() and os.path.isfile(os.path.join(partial, "block-00000.spqr"))
    assert not os.path.exists(os.path.join(partial, "block-00001.spqr"))

    # Settings that differ from the checkpoints' are refused.
    r = CliRunner().invoke(main, ["quantize-model", str(mdir), "-o", str(out), "--calib",
                                  str(corpus), "--samples", "5", "--seq-len", str(SEQ),
                                  "--resume"])  # fmt: skip
    assert r.exit_code == 2 and "other settings" in r.output, r.output

    r = CliRunner().invoke(main, ["quantize-model", str(mdir), "-o", str(out), "--calib",
                                  str(corpus), "--samples", str(SAMPLES), "--seq-len", str(SEQ),
                                  "--resume"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "(1 blocks resumed)" in r.output
    assert out.read_bytes() == full.read_bytes()
    assert not os.path.exists(partial)


def test_cli_quantize_and_eval(model_dir, corpus, tmp_path):
    mdir = model_dir("gpt2")
    out = tmp_path / "g.spqr"
    r = CliRunner().invoke(main, ["quantize-model", str(mdir), "-o", str(out), "--preset",
                                  "gptq-3bit-g128", "--calib", str(corpus), "--samples", "4",
                                  "--seq-len", "32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "block 2/2 done" in r.output and "ETA" in r.output
    assert "layer 4/4 mlp.c_proj" in r.output
    docs = []
    opts = ["--ppl", str(corpus), "--seq-len", "64", "--stride", "32", "--max-tokens", "600"]
    for target in ([str(out), "--model-dir", str(mdir)], [str(mdir)]):
        r = CliRunner().invoke(main, ["eval", *target, *opts, "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert (doc["seq_len"], doc["stride"], doc["text_tokens"]) == (64, 32, 600)
        assert doc["tokens"] == 599 and math.isfinite(doc["perplexity"])
        docs.append(doc)
    assert docs[0]["source"] == ".spqr file" and docs[1]["source"] == "model directory"
    r = CliRunner().invoke(main, ["eval", str(mdir), "--ppl", str(corpus), "--seq-len", "64",
                                  "--max-tokens", "300"])  # fmt: skip
    assert r.exit_code == 0 and "context 64, stride 64" in r.output

    # several models: one tokenizer (the directory's), the same windows, one table
    r = CliRunner().invoke(main, ["eval", str(mdir), str(out), *opts])
    assert r.exit_code == 0, r.output
    assert "| model | perplexity | change | file MB |" in r.output
    by_model = {d["model"]: d["perplexity"] for d in docs}
    for path in (str(mdir), str(out)):
        assert f"| {path} | {by_model[path]:.3f} |" in r.output
    r = CliRunner().invoke(main, ["eval", str(mdir), str(out), *opts, "--json"])
    assert [d["perplexity"] for d in json.loads(r.stdout)] == [by_model[str(mdir)],
                                                               by_model[str(out)]]

    # quantize-model --eval-ppl: the same table after the file is written
    out2 = tmp_path / "g2.spqr"
    r = CliRunner().invoke(main, ["quantize-model", str(mdir), "-o", str(out2), "--preset",
                                  "gptq-3bit-g128", "--calib", str(corpus), "--samples", "4",
                                  "--seq-len", "32", "-q", "--eval-ppl", str(corpus),
                                  "--eval-seq-len", "64"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert out2.read_bytes() == out.read_bytes()
    assert "| model | perplexity | change | file MB |" in r.output and str(out2) in r.output


def test_perplexity_windows_score_each_token_once():
    class Uniform(torch.nn.Module):
        """A 'causal LM' that gives the token it sees probability 1/2 as the next one."""

        def forward(self, input_ids, use_cache=False):
            v = 10
            logits = torch.zeros(*input_ids.shape, v)
            logits.scatter_(2, input_ids.unsqueeze(2), math.log(v - 1))  # p = 1/2
            return type("Out", (), {"logits": logits})()

    Uniform.__name__ = "UniformForCausalLM"
    ids = np.arange(100) % 10
    for seq, stride in ((16, 16), (16, 5), (7, 1)):
        res = perplexity(Uniform(), ids, seq_len=seq, stride=stride)
        # stride < seq_len: every token after the first; disjoint windows (HF's method):
        # the first token of each window has no context and is not scored
        assert res["tokens"] == (99 if stride < seq else 100 - res["windows"])
        expected = math.log(2 * (10 - 1))  # every token differs from the one before
        assert res["nll"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("trained")
    tm.build_model("llama", d, corpus.read_text(encoding="utf-8"), train_steps=150, seed=1)
    return d


def test_trained_model_quantized_ppl_is_close(trained_llama, corpus, tmp_path):
    out = tmp_path / "t.spqr"
    quantize_model(trained_llama, out, preset="spqr-3bit", calib=str(corpus), samples=8,
                   seq_len=64)  # fmt: skip
    tok = hf.load_tokenizer(str(trained_llama))
    ids = data.tokenize(tok, corpus.read_text(encoding="utf-8"))[-1500:]
    fp = perplexity(hf.load_hf_model(str(trained_llama)), ids, seq_len=64)["perplexity"]
    q = perplexity(load_model(out), ids, seq_len=64)["perplexity"]
    vocab = len(tok)
    assert fp < vocab / 3  # it learned something
    print(f"trained tiny llama: fp32 ppl {fp:.3f}, spqr-3bit ppl {q:.3f}")
    assert fp <= q * 1.05 and q < 1.5 * fp, (fp, q)


def _one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], r.output


def test_bad_inputs(model_dir, corpus, tmp_path):
    mdir = str(model_dir("llama"))
    out = str(tmp_path / "x.spqr")
    run = CliRunner().invoke

    def q(*args):
        return run(main, ["quantize-model", *args])

    base = ["-o", out, "--calib", str(corpus)]
    _one_line_error(q(str(tmp_path / "missing"), *base), "model directory not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(q(str(empty), *base), "no config.json")
    (empty / "config.json").write_text((model_dir("llama") / "config.json").read_text())
    _one_line_error(q(str(empty), *base), "no *.safetensors")
    _one_line_error(q(mdir, *base, "--samples", "0"), "--samples")
    _one_line_error(q(mdir, *base, "--samples", "1000", "--seq-len", "64"), "too short",
                    "corpus.txt")  # fmt: skip
    _one_line_error(q(mdir, *base, "--seq-len", "4096"), "positions")
    if not torch.cuda.is_available():
        _one_line_error(
            q(mdir, *base, "--device", "cuda"), "--device cuda", "CUDA is not available"
        )
    _one_line_error(q(mdir, *base, "--device", "tpu"), "unknown device 'tpu'")
    small = ["--samples", "2", "--seq-len", "32"]
    _one_line_error(q(mdir, "-o", out, "--calib", str(tmp_path / "nope.txt"), *small), "nope.txt")
    _one_line_error(q(mdir, "-o", out, "--calib", "wikitext2", *small), "data directory")
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")

    _one_line_error(run(main, ["eval", out, "--ppl", str(corpus)]), "no such file")
    spqr_format.save(out, {"w": np.zeros((2, 2), np.float32)})
    _one_line_error(run(main, ["eval", out, "--ppl", str(corpus)]), "--model-dir")
    _one_line_error(run(main, ["eval", out, "--model-dir", mdir, "--ppl", str(corpus)]),
                    "not a whole-model file")  # fmt: skip
    _one_line_error(run(main, ["eval", mdir, "--ppl", str(corpus), "--stride", "600"]),
                    "--stride")  # fmt: skip
    _one_line_error(run(main, ["eval", str(model_dir("bert")), "--ppl", str(corpus)]),
                    "causal language model")  # fmt: skip
    # encoder-decoder: refused before any work (not half of the model quantized)
    _one_line_error(q(str(model_dir("t5")), *base), "encoder-decoder", "T5ForConditionalGeneration")
    out3 = str(tmp_path / "y.spqr")
    _one_line_error(q(mdir, "-o", out3, "--calib", str(corpus), "--eval-ppl",
                      str(tmp_path / "none.txt")), "none.txt")  # fmt: skip
    assert not os.path.exists(out3)


@pytest.fixture(scope="module")
def starved_mixtral(tmp_path_factory, corpus):
    """A tiny Mixtral (6 experts, top 2) whose routers never choose experts 4 and 5: rows
    0-3 come in opposite pairs (w, -w), so the two best logits are |x.w0| and |x.w2| >= 0,
    and rows 4 and 5 are zero (logit 0, never strictly above them)."""
    d = tmp_path_factory.mktemp("starved-mixtral")
    text = corpus.read_text(encoding="utf-8")
    tok = tm.make_tokenizer(text)
    config = tm.make_config("mixtral", len(tok))
    config.num_local_experts = 6
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1], w[3] = -w[0], -w[2]
            w[4:] = 0
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


STARVED = {f"model.layers.{i}.mlp.experts.{p}[{e}]" for i in (0, 1) for e in (4, 5)
           for p in ("gate_up_proj", "down_proj")}  # fmt: skip


def _check_starved(rows, enc="bilevel"):
    """Experts 4 and 5 saw no token: encoded anyway with an identity Hessian, reported."""
    experts = {r["name"]: r for r in rows if "experts" in r["name"]}
    assert len(experts) == 2 * 2 * 6 and {r["encoding"] for r in experts.values()} == {enc}
    assert {n for n, r in experts.items() if r["calibration_tokens"] == 0} == STARVED
    for n, r in experts.items():
        if n in STARVED:
            assert r["fallback"] and "identity Hessian" in r["warning"], r
            assert r["relative_output_error"] is None
            assert 0 < r["relative_weight_error"] < 0.5  # quantized, not zeroed
        else:
            assert r["calibration_tokens"] > 0 and r["relative_output_error"] is not None


def test_moe_experts_without_calibration_tokens(starved_mixtral, corpus, tmp_path):
    """The user's commands on a mixture of experts whose router sends no calibration token to
    some experts: quantize-model encodes them with an identity Hessian (no error), says so,
    and the file evaluates and loads back exactly."""
    mdir, out = str(starved_mixtral), str(tmp_path / "moe.spqr")
    r = CliRunner().invoke(main, ["quantize-model", mdir, "-o", out, "--calib", str(corpus),
                                  "--samples", str(SAMPLES), "--seq-len", str(SEQ)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.count("no calibration tokens: identity Hessian") == len(STARVED)
    assert "32 quantized layers" in r.output  # 2 x (4 attention + 2 x 6 experts)
    with spqr_format.open(out) as f:
        meta = f.metadata
        _check_starved(meta["encoder.report"])
        assert f.info("model.layers.0.mlp.gate.weight").encoding == "raw"  # the router
        decoded = torch.from_numpy(np.stack([f.decode(f"model.layers.1.mlp.experts.down_proj[{e}]",
                                                      "float32") for e in range(6)]))  # fmt: skip
    assert meta["model.stacked"]["model.layers.1.mlp.experts.down_proj"] == 6
    loaded = load_model(out, mdir)
    assert torch.equal(loaded.model.layers[1].mlp.experts.down_proj, decoded)
    r = CliRunner().invoke(main, ["eval", mdir, out, "--ppl", str(corpus), "--seq-len", "64",
                                  "--max-tokens", "600", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    fp, q = (d["perplexity"] for d in json.loads(r.stdout))
    assert math.isfinite(q) and abs(q / fp - 1) < 0.05, (fp, q)


def test_moe_experts_without_tokens_cmpq_and_torch_encoder(starved_mixtral, corpus, tmp_path,
                                                           monkeypatch):  # fmt: skip
    """CMPQ (which needs activation statistics) and the torch encoder of --device cuda (run on
    torch's CPU) take the same identity Hessian for the starved experts."""
    from spqr_format.codec.cmpq import CmpqConfig
    from spqr_format.models import pipeline

    res = _quantize(starved_mixtral, tmp_path / "c.spqr", corpus,
                    config=CmpqConfig(target_bits=5.0))  # fmt: skip
    _check_starved(res.reports, "channel_mixed")
    monkeypatch.setattr(pipeline, "_encoder_device", lambda d: None if d == "cpu" else
                        torch.device("cpu"))  # fmt: skip
    res = _quantize(starved_mixtral, tmp_path / "t.spqr", corpus, device="torch-cpu")
    _check_starved(res.reports)


def test_moe_list_of_experts_without_tokens(model_dir, corpus, tmp_path, monkeypatch):
    """transformers 4's layout: experts as an nn.ModuleList of MLPs of nn.Linear, the router
    an nn.Linear beside them. The router stays raw; experts it never chooses are encoded with
    an identity Hessian, as stacked ones are."""
    nn = torch.nn

    class Expert(nn.Module):
        def __init__(self, gate_up, down):
            super().__init__()
            inter = down.shape[1]
            self.w1, self.w3 = nn.Linear(gate_up.shape[1], inter, bias=False), nn.Linear(
                gate_up.shape[1], inter, bias=False)  # fmt: skip
            self.w2 = nn.Linear(inter, down.shape[0], bias=False)
            self.w1.weight.data, self.w3.weight.data = gate_up[:inter], gate_up[inter:]
            self.w2.weight.data = down

        def forward(self, x):
            return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))

    class ListMoe(nn.Module):
        def __init__(self, moe):
            super().__init__()
            n = moe.experts.num_experts
            self.gate = nn.Linear(moe.gate.weight.shape[1], n, bias=False)
            self.gate.weight.data = moe.gate.weight.data.clone()
            w = self.gate.weight.data
            w[1], w[2:] = -w[0], 0  # top 1 of (a, -a, 0, 0): experts 2 and 3 never chosen
            self.experts = nn.ModuleList(
                Expert(moe.experts.gate_up_proj.data[e].clone(),
                       moe.experts.down_proj.data[e].clone()) for e in range(n))  # fmt: skip

        def forward(self, h):
            x = h.reshape(-1, h.shape[-1])
            w, idx = torch.topk(torch.softmax(self.gate(x), -1), 1, dim=-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                rows, slot = torch.where(idx == e)
                if len(rows):  # as transformers 4 does: an expert without tokens is not run
                    out.index_add_(0, rows, w[rows, slot, None] * expert(x[rows]))
            return out.reshape(h.shape)

    real = hf.load_hf_model

    def load_as_list(path, **kw):
        m = real(path, **kw)
        for layer in m.model.layers:
            layer.mlp = ListMoe(layer.mlp)
        return m

    from spqr_format.models import pipeline

    monkeypatch.setattr(pipeline.hf, "load_hf_model", load_as_list)
    res = _quantize(model_dir("mixtral"), tmp_path / "l.spqr", corpus)
    rows = {r["name"]: r for r in res.reports}
    assert rows["model.layers.0.mlp.gate.weight"]["encoding"] == "raw"
    experts = {n: r for n, r in rows.items() if ".experts." in n}
    assert len(experts) == 2 * 4 * 3 and {r["encoding"] for r in experts.values()} == {"bilevel"}
    starved = {n for n, r in experts.items() if r["calibration_tokens"] == 0}
    assert starved and starved == {n for n in experts if n.split(".")[5] in ("2", "3")}, starved
    assert all(experts[n]["fallback"] for n in starved)


def test_unknown_expert_layout_is_reported(model_dir, corpus, tmp_path):
    """JetMoE keeps its experts in 3-D parameters of its own layout: they stay raw, and
    quantize-model says so instead of leaving them silently."""
    events = []
    res = _quantize(model_dir("jetmoe"), tmp_path / "j.spqr", corpus, progress=events.append)
    notes = [e["stage"] for e in events if e["kind"] == "stage" and "note:" in e["stage"]]
    assert len(notes) == 1 and "note: 8 weights" in notes[0], notes
    assert "model.layers.0.mlp.input_linear.weight" in notes[0]
    rows = {r["name"]: r for r in res.reports}
    assert rows["model.layers.0.mlp.input_linear.weight"]["encoding"] == "raw"
    assert rows["model.layers.0.self_attention.kv_proj.weight"]["encoding"] == "bilevel"


def test_walker_refuses_a_model_without_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with pytest.raises(BadInputError, match="no list of repeated blocks"):
        find_blocks(model)
    mixed = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4))])
    with pytest.raises(BadInputError):
        find_blocks(torch.nn.Sequential(mixed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and CuPy)")
def test_load_model_on_gpu(model_dir, corpus, tmp_path):  # pragma: no cover - GPU only
    pytest.importorskip("cupy")
    from spqr_format.gpu.nn import SpQRLinear

    out = tmp_path / "gpu.spqr"
    _quantize(model_dir("llama"), out, corpus)
    m = load_model(out, device="cuda")
    assert sum(isinstance(x, SpQRLinear) for x in m.modules()) == 14
    ref = load_model(out).half().cuda()
    x = torch.arange(3, 27, device="cuda").unsqueeze(0)
    a, b = ref(input_ids=x).logits.float(), m(input_ids=x).logits.float()
    assert torch.allclose(a, b, atol=5e-2, rtol=5e-2)


class _Interrupted(Exception):
    pass


def _interrupt_after_block_0(mdir, out, corpus, **kw):
    def stop(ev):
        if ev["kind"] == "block_done" and ev["block"] == 0:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        _quantize(mdir, out, corpus, progress=stop, **kw)


def _interrupted_then_resumed(mdir, out, corpus, **kw):
    """Quantize, stopped after block 0, then resumed: returns the QuantizeResult."""
    _interrupt_after_block_0(mdir, out, corpus, **kw)
    res = _quantize(mdir, out, corpus, resume=True, **kw)
    assert res.resumed_blocks == 1
    return res


def _check_gpu_encoder_file(path, mdir, cpu_path, device_kind):
    with spqr_format.open(path) as f, spqr_format.open(cpu_path) as c:
        impl = f.metadata["encoder.implementation"]
        assert impl["solver"] == "spqr_format.codec.gptq_torch"
        assert impl["device"] == device_kind
        assert c.metadata["encoder.implementation"]["device"] == "cpu"
        assert f.names() == c.names()
        got = {r["name"]: r for r in f.metadata["encoder.report"] if r["encoding"] == "bilevel"}
        ref = {r["name"]: r for r in c.metadata["encoder.report"] if r["encoding"] == "bilevel"}
        assert got.keys() == ref.keys() and len(got) == 14
        # Later blocks see slightly different inputs (other decisions upstream): the errors
        # agree on average, layer by layer loosely.
        e_got = np.mean([r["relative_output_error"] for r in got.values()])
        e_ref = np.mean([r["relative_output_error"] for r in ref.values()])
        assert abs(e_got / e_ref - 1) < 0.05, (e_got, e_ref)
        # The model holds what the file decodes to.
        sd = load_model(path, mdir).state_dict()
        for name in got:
            assert torch.equal(sd[name], torch.from_numpy(f.decode(name, "float32"))), name


def test_gpu_encoder_path_on_torch_cpu(model_dir, corpus, tmp_path, monkeypatch):
    """The --device cuda code path (torch accumulators and encoder, block moves, weights put
    back from the reconstruction, checkpoints) run on torch's CPU device."""
    from spqr_format.models import pipeline

    mdir = model_dir("llama")
    cpu = tmp_path / "cpu.spqr"
    _quantize(mdir, cpu, corpus)
    monkeypatch.setattr(pipeline, "_encoder_device", lambda d: None if d == "cpu" else
                        torch.device("cpu"))  # fmt: skip
    full = tmp_path / "t.spqr"
    _quantize(mdir, full, corpus, device="torch-cpu")
    _check_gpu_encoder_file(full, mdir, cpu, "cpu")
    cut = tmp_path / "cut.spqr"
    _interrupted_then_resumed(mdir, cut, corpus, device="torch-cpu")
    assert cut.read_bytes() == full.read_bytes()
    # Checkpoints of one encoder are not resumed with the other.
    _interrupt_after_block_0(mdir, cut, corpus, device="torch-cpu")
    with pytest.raises(BadInputError, match="other settings"):
        _quantize(mdir, cut, corpus, resume=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_cuda(model_dir, corpus, tmp_path):  # pragma: no cover - GPU only
    mdir = model_dir("llama")
    cpu = tmp_path / "cpu.spqr"
    _quantize(mdir, cpu, corpus)
    gpu = tmp_path / "gpu.spqr"
    _quantize(mdir, gpu, corpus, device="cuda")
    _check_gpu_encoder_file(gpu, mdir, cpu, "cuda")
    cut = tmp_path / "cut.spqr"
    _interrupted_then_resumed(mdir, cut, corpus, device="cuda")
    assert cut.read_bytes() == gpu.read_bytes()
    # fp16 model: the weights put back are rounded to fp16 exactly as a reader decodes them
    m16 = model_dir("llama", torch.float16)
    a, b = tmp_path / "a16.spqr", tmp_path / "b16.spqr"
    _quantize(m16, a, corpus, preset="gptq-4bit-g128", device="cuda")
    _interrupted_then_resumed(m16, b, corpus, preset="gptq-4bit-g128", device="cuda")
    assert a.read_bytes() == b.read_bytes()


def test_cmpq_model_quantize_load(model_dir, corpus, tmp_path):
    """--method cmpq: every block linear becomes a channel_mixed tensor at the target (each
    layer met within 32 bits), the file loads back exactly as decoded, and an unreachable
    target is refused before any output exists."""
    from spqr_format.codec.cmpq import CmpqConfig

    mdir = model_dir("llama")
    out = tmp_path / "c.spqr"
    res = quantize_model(mdir, out, config=CmpqConfig(target_bits=5.0), calib=str(corpus),
                         samples=SAMPLES, seq_len=SEQ)  # fmt: skip
    quant = [r for r in res.reports if r["encoding"] == "channel_mixed"]
    assert len(quant) >= 8 and not [r for r in res.reports if r["encoding"] == "bilevel"]
    with spqr_format.open(out) as f:
        infos = {i.name: i for i in f.infos()}
        for r in quant:
            info = infos[r["name"]]
            assert info.encoding == "channel_mixed"
            m, n = info.shape
            assert 5.0 - 32 / (m * n) <= info.bits_per_weight <= 5.0 + 1e-9, r["name"]
        ref = hf.load_hf_model(str(mdir))
        sd = ref.state_dict()
        for r in quant:
            sd[r["name"]].copy_(torch.from_numpy(f.decode(r["name"], "float32")))
        assert f.metadata["encoder.method"] == "cmpq"
    loaded = load_model(out, mdir)
    x = torch.arange(3, 3 + 24).unsqueeze(0) % ref.config.vocab_size
    with torch.no_grad():
        assert torch.equal(ref(input_ids=x).logits, loaded(input_ids=x).logits)

    r = CliRunner().invoke(main, ["quantize-model", str(mdir), "-o", str(tmp_path / "u.spqr"),
                                  "--method", "cmpq", "--target-bits", "2", "--calib",
                                  str(corpus), "--samples", "2", "--seq-len", "32"])  # fmt: skip
    _one_line_error(r, "unreachable", "target_bits")
    assert not (tmp_path / "u.spqr").exists() and not (tmp_path / "u.spqr.partial").exists()
    r = CliRunner().invoke(main, ["quantize-model", str(mdir), "-o", str(tmp_path / "u.spqr"),
                                  "--method", "cmpq", "--calib", str(corpus)])  # fmt: skip
    _one_line_error(r, "--target-bits")
