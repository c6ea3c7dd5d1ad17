"""The layer-by-layer driver on the real nano model: statistics sharing, replacement, factors."""

import copy

import pytest
import torch
from torch import nn

from eora_ft.compress import CompressedLinear, StatsCollector, make_compressor
from eora_ft.compress.stats import StatisticsComplete
from eora_ft.init.sequential import compress_model, find_decoder_layers
from eora_ft.init import loftq_factors

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _calib(n=4, length=64, seed=0):
    return torch.randint(1, 8192, (n, length), generator=torch.Generator().manual_seed(seed))


def test_each_distinct_input_is_accumulated_once(nano_model_and_tokenizer):
    model, _ = nano_model_and_tokenizer
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    collector = StatsCollector(linears)
    hidden = torch.randn(2, 16, 256)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(16).unsqueeze(0))
    try:
        with torch.no_grad():
            for _ in range(3):
                collector.next_batch()
                with pytest.raises(StatisticsComplete):  # down_proj, the last linear, ends the forward
                    layer(hidden, position_embeddings=position_embeddings)
    finally:
        collector.remove()
    distinct = collector.distinct()
    assert len(distinct) == 4  # q/k/v share, o alone, gate/up share, down alone
    s = collector.stats
    assert s["self_attn.q_proj"] is s["self_attn.k_proj"] is s["self_attn.v_proj"]
    assert s["mlp.gate_proj"] is s["mlp.up_proj"] and s["mlp.down_proj"] is not s["mlp.up_proj"]
    assert all(st.batches == 3 and st.tokens == 3 * 2 * 16 for st in distinct)


def test_output_energy_is_the_squared_output_norm_without_bias_over_the_unmasked_tokens():
    g = torch.Generator().manual_seed(5)
    linears = {"shared_a": nn.Linear(12, 7, bias=True), "shared_b": nn.Linear(12, 5, bias=False)}
    collector = StatsCollector(linears)
    x = torch.randn(2, 6, 12, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding
    try:
        with torch.no_grad():
            for _ in range(2):
                collector.next_batch(mask)
                linears["shared_a"](x)
                with pytest.raises(StatisticsComplete):  # every collected linear has now seen the batch
                    linears["shared_b"](x)
    finally:
        collector.remove()
    kept = x[mask].double()
    for name, module in linears.items():
        want = 2 * float((kept @ module.weight.double().t()).square().sum())
        # the outputs are fp32 products: their squares summed in fp64 agree to fp32 round-off
        assert collector.output_energy[name] == pytest.approx(want, rel=1e-5)
    assert collector.stats["shared_a"] is collector.stats["shared_b"] and collector.stats["shared_a"].tokens == 20


def test_compress_model_replaces_linears_and_factors_the_error(nano_model_and_tokenizer):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    ids = _calib()
    with torch.no_grad():
        before = model(input_ids=ids[:1]).logits
    result = compress_model(model, ids, make_compressor("gptq", bits=4, group_size=128), ["eora", "svd"], rank=8,
                            target_modules=LINEARS, batch_size=2, progress=False)
    compressed = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    assert len(compressed) == 4 * 7 and len(result.factors) == 28
    assert not any(isinstance(m, nn.Linear) for n, m in model.model.layers.named_modules())
    assert result.calib_tokens == ids.numel()
    for row in result.layers:
        assert row["tokens"] == ids.numel()
        assert row["rel_out_err/eora"] <= row["rel_out_err/svd"] + 1e-6 <= row["rel_out_err/compressed"] + 2e-6
    with torch.no_grad():
        after = model(input_ids=ids[:1]).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_no_decoder_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no decoder layers found in Sequential"):
        find_decoder_layers(nn.Sequential(nn.Linear(4, 4)))


def test_empty_calibration_is_rejected(nano_model_and_tokenizer):
    model = copy.deepcopy(nano_model_and_tokenizer[0])
    with pytest.raises(ValueError, match="non-empty"):
        compress_model(model, torch.zeros(0, 16, dtype=torch.long), make_compressor("rtn", bits=4), progress=False)


def test_loftq_base_replaces_the_module_and_capture_modes_differ(nano_model_and_tokenizer):
    ids = _calib(n=2, length=32)
    compressor = make_compressor("rtn", bits=2, group_size=128)
    loftq_model = copy.deepcopy(nano_model_and_tokenizer[0])
    result = compress_model(loftq_model, ids, compressor, ["loftq"], rank=4, init_options={"loftq": {"iters": 2}},
                            target_modules=LINEARS, base_from="loftq", progress=False)
    path = "model.layers.2.mlp.down_proj"
    # RTN ignores the statistics: LoftQ on the original weight gives this layer's Q_T again
    original = nano_model_and_tokenizer[0].get_submodule(path).weight.detach()
    own = loftq_factors(original, compressor, None, 4, iters=2).base.dequantize()
    assert torch.equal(loftq_model.get_submodule(path).dequantize(torch.float32), own)
    # the packed module is the only copy kept: no layer's int64 codes pile up in the result (8B: tens of GB)
    assert all(f["loftq"].base is None for f in result.factors.values())

    plain, compensated = (copy.deepcopy(nano_model_and_tokenizer[0]) for _ in range(2))
    a = compress_model(plain, ids, compressor, ["eora"], rank=4, target_modules=LINEARS, progress=False)
    b = compress_model(compensated, ids, compressor, ["eora"], rank=4, target_modules=LINEARS,
                       capture="compensated", progress=False)
    first = "model.layers.0.self_attn.q_proj"  # sees the embeddings either way
    assert torch.equal(a.factors[first]["eora"].a, b.factors[first]["eora"].a)
    later = "model.layers.3.self_attn.q_proj"
    assert not torch.equal(a.factors[later]["eora"].a, b.factors[later]["eora"].a)
    with pytest.raises(ValueError, match="capture='nope'"):
        compress_model(plain, ids, compressor, ["eora"], capture="nope", progress=False)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("method,options", [
    ("rtn", {"bits": 8, "group_size": 32}),  # the largest quantized storage: 8-bit codes, the smallest groups
    ("gptq", {"bits": 4, "group_size": 128}),
    ("sparsegpt", {"sparsity": "2:4"}),
    ("wanda", {"sparsity": "4:8"}),
    ("gptq+sparsegpt", {"bits": 4, "group_size": 32, "sparsity": "2:4"}),
    ("nf4", {}),
])
def test_every_compressed_linear_is_smaller_than_the_bf16_linear_it_replaces(nano_model_and_tokenizer, method, options):
    model = copy.deepcopy(nano_model_and_tokenizer[0]).to(torch.bfloat16)
    dense = {name: _bytes(m) for name, m in model.named_modules() if name.split(".")[-1] in LINEARS}
    compress_model(model, _calib(n=2, length=32), make_compressor(method, **options), target_modules=LINEARS,
                   progress=False)
    for name, size in dense.items():
        stored = _bytes(model.get_submodule(name))
        # a pruned-only layer at bf16 keeps half its values (2 bytes) + one bit per weight: 9/16 of the dense
        # bytes; quantized storage is smaller still (8-bit g32 with bf16 scales: 0.55)
        assert stored <= 9 / 16 * size, (name, stored, size)


def test_one_layer_at_a_time_moves_to_the_execution_device_and_back(nano_model_and_tokenizer, monkeypatch):
    """The model stays where it was loaded: each decoder layer alone goes to the execution device (a no-op
    move on a CPU-only machine, so the moves themselves are recorded) and returns home before the next."""
    import weakref

    from eora_ft.compress import stats as stats_module

    model = copy.deepcopy(nano_model_and_tokenizer[0])
    moves, alive, peak = [], weakref.WeakSet(), []
    for index, layer in enumerate(model.model.layers):
        original_to = layer.to

        def recording_to(*args, _index=index, _to=original_to, **kwargs):
            moves.append((_index, str(args[0] if args else kwargs.get("device"))))
            return _to(*args, **kwargs)

        layer.to = recording_to
    created = stats_module.ActivationStats.__init__

    def tracked_init(self, *args, **kwargs):
        created(self, *args, **kwargs)
        alive.add(self)
        peak.append(len(alive))

    monkeypatch.setattr(stats_module.ActivationStats, "__init__", tracked_init)
    result = compress_model(model, _calib(n=2, length=32), make_compressor("gptq", bits=4), ["eora"], rank=4,
                            target_modules=LINEARS, progress=False, execution_device="cpu",
                            activations_device="cpu")
    assert moves == [(i, device) for i in range(4) for device in ("cpu", "cpu")]  # there, then home
    # statistics of one decoder layer only (4 distinct inputs: q/k/v, o, gate/up, down), never the model's
    assert max(peak) <= 4 and len(result.factors) == 28


def test_relative_output_error_from_the_statistics_equals_the_one_from_activations():
    from eora_ft.compress import ActivationStats
    from eora_ft.init.accounting import OutputError

    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 24, dtype=torch.float64)
    stats = ActivationStats(24)
    stats.add_batch(x)
    weight, delta = torch.randn(10, 24, generator=g), torch.randn(10, 24, generator=g) * 0.1
    a, b = torch.randn(3, 24, generator=g) * 0.1, torch.randn(10, 3, generator=g) * 0.1
    errors = OutputError(delta, weight, stats.xtx)

    def direct(e):
        return float(torch.linalg.norm(e.double() @ x.t()) / torch.linalg.norm(weight.double() @ x.t()))

    assert errors.of() == pytest.approx(direct(delta), rel=1e-10)
    assert errors.of(a, b) == pytest.approx(direct(delta.double() - b.double() @ a.double()), rel=1e-10)


@pytest.mark.gpu
def test_on_a_gpu_the_model_stays_on_the_cpu_and_the_gpu_holds_about_one_layer(nano_model_and_tokenizer):
    """A 16-layer model of the nano's width: compressing it on the GPU keeps every weight on the CPU, and the
    GPU's peak is a fraction of the model (one layer, its activations, its statistics)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(nano_model_and_tokenizer[0].config)
    config.num_hidden_layers = 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    torch.cuda.reset_peak_memory_stats()
    result = compress_model(model, _calib(n=8, length=128), make_compressor("gptq", bits=4), ["eora"], rank=8,
                            target_modules=LINEARS, progress=False, execution_device="cuda")
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert all(f["eora"].a.device.type == "cpu" for f in result.factors.values())
    peak = torch.cuda.max_memory_allocated()
    assert peak < 4 * layer_bytes + 8 * 128 * 768 * 4 * 4 + 16 * 2**20, (peak, layer_bytes)
    assert peak < 16 * layer_bytes / 3


def test_a_q_k_v_statistics_pass_stops_before_attention_and_the_mlp(nano_model_and_tokenizer):
    """Collecting the first stage's statistics ends each forward at the last of q/k/v: o, gate, up and down
    never run, and the statistics equal those of a full forward."""
    model, _ = nano_model_and_tokenizer
    layer = model.model.layers[0]
    hidden = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(1))
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, torch.arange(16).unsqueeze(0))}
    ran = []
    handles = [m.register_forward_hook(lambda *_, n=name: ran.append(n))
               for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    from eora_ft.init.sequential import _collect

    stage = {n: layer.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    try:
        with torch.no_grad():
            collector = _collect(layer, [(hidden, kwargs)] * 2, stage)
    finally:
        for handle in handles:
            handle.remove()
    assert set(ran) == set(stage)
    x = hidden.reshape(-1, 256)
    normed = layer.input_layernorm(x).double()
    # fp32 products of 32 tokens per batch: entries of size ~30 carry round-off of ~eps32 * 64 (the two sums)
    assert torch.allclose(collector.stats["self_attn.q_proj"].xtx, 2 * normed.t() @ normed, rtol=1e-5, atol=1e-4)


def test_true_sequential_recollects_later_stages_from_the_partly_compressed_layer(nano_model_and_tokenizer):
    """Off (the default): every linear's statistics come from one pass over the layer as it arrived, so the first
    layer's o_proj statistics equal those of the uncompressed model. On: o_proj's are re-collected after q/k/v
    are compressed, so they differ; q/k/v's (the first stage) are the same in both modes."""
    ids = _calib(n=2, length=32, seed=3)
    compressor = make_compressor("gptq", bits=2, group_size=128)
    results = {}
    for mode in (False, True):
        model = copy.deepcopy(nano_model_and_tokenizer[0])
        results[mode] = compress_model(model, ids, compressor, [], target_modules=LINEARS, batch_size=2,
                                       progress=False, keep_stats=True, true_sequential=mode)
    reference = copy.deepcopy(nano_model_and_tokenizer[0])
    layer = reference.model.layers[0]
    collector = StatsCollector({"self_attn.o_proj": layer.self_attn.o_proj})
    try:
        with torch.no_grad():
            collector.next_batch()
            with pytest.raises(StatisticsComplete):
                reference(input_ids=ids)
    finally:
        collector.remove()
    o_path, q_path = "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"
    uncompressed = collector.stats["self_attn.o_proj"].xtx
    scale = float(uncompressed.abs().max())
    assert torch.allclose(results[False].stats[o_path].xtx, uncompressed, rtol=1e-5, atol=1e-6 * scale)
    assert not torch.allclose(results[True].stats[o_path].xtx, uncompressed, rtol=1e-3, atol=1e-4 * scale)
    assert torch.allclose(results[True].stats[q_path].xtx, results[False].stats[q_path].xtx, rtol=1e-6, atol=0)
