"""
The fast inference path: which precision runs on which machine (CPU flags given as data, so an AMX
Xeon, an AVX-512 Xeon and an AVX2-only EPYC are all checked on any machine), and what each path computes.
"""

from __future__ import annotations

import pytest
import torch

from custom_nets import AdaptiveCENet
from custom_nets.engines.fast_path import (
    FastForward,
    PrecisionUnavailableError,
    choose_precision,
    cpu_info,
    fast_network,
    native_bf16,
)

AMX_XEON = {"model": "Intel Xeon (AMX)", "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"], "onednn_max_isa": None}
AVX512_BF16_XEON = {"model": "Intel Xeon (Cooper Lake)", "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], "onednn_max_isa": None}
AVX2_EPYC = {"model": "AMD EPYC", "flags": ["avx2"], "onednn_max_isa": None}


def test_cpu_info_reads_this_machine():
    info = cpu_info()
    assert info["model"] and isinstance(info["flags"], list)
    assert info["torch_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize(
    "info, expected",
    [(AMX_XEON, "AMX-BF16"), (AVX512_BF16_XEON, "AVX512-BF16"), (AVX2_EPYC, None),
     ({**AMX_XEON, "onednn_max_isa": "AVX2"}, None), ({**AMX_XEON, "onednn_max_isa": "AVX512_CORE_VNNI"}, None),
     ({**AMX_XEON, "onednn_max_isa": "AVX512_CORE_AMX"}, "AMX-BF16")],
    ids=["amx", "avx512-bf16", "avx2", "amx-capped-avx2", "amx-capped-vnni", "amx-cap-amx"],
)  # fmt: skip
def test_native_bf16_follows_the_flags_and_onednn_cap(info, expected):
    assert native_bf16(info) == expected


def test_auto_on_cpu_without_int8_model(tmp_path):
    assert choose_precision("auto", "cpu", tmp_path / "none.onnx", info=AMX_XEON).precision == "bf16"
    fallback = choose_precision("auto", "cpu", tmp_path / "none.onnx", info=AVX2_EPYC)
    assert fallback.precision == "fp32"
    assert "AMD EPYC" in fallback.reason and "no native bf16" in fallback.reason and "none.onnx not found" in fallback.reason
    # rehearsing a CPU without AMX on one that has it: oneDNN's own cap
    capped = choose_precision("auto", "cpu", None, info={**AMX_XEON, "onednn_max_isa": "AVX2"})
    assert capped.precision == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in capped.reason


def test_auto_order_puts_bf16_first_for_a_bundle_that_asks(tmp_path):
    """The CT bundle's order: bf16 before int8 (int8 misses its memory bound there); fp32 still ends it."""
    order = ("bf16", "int8", "fp32")
    assert choose_precision("auto", "cpu", tmp_path / "none.onnx", info=AMX_XEON, auto_order=order) == ("bf16", "CPU has AMX-BF16")
    fallback = choose_precision("auto", "cpu", tmp_path / "none.onnx", info=AVX2_EPYC, auto_order=order)
    assert fallback.precision == "fp32" and fallback.reason.index("no native bf16") < fallback.reason.index("none.onnx not found")
    with pytest.raises(PrecisionUnavailableError, match="auto_order may hold int8, bf16 and fp32 only, got 'fp16'"):
        choose_precision("auto", "cpu", None, info=AMX_XEON, auto_order=("fp16",))


def test_the_ct_bundle_prefers_bf16(repo_root):
    import json

    config = json.loads((repo_root / "bundles/lung_nodule_ct_segmentation/configs/inference.json").read_text())
    assert config["auto_order"] == ["bf16", "int8", "fp32"] and "@auto_order" in config["fast_network"]


@pytest.mark.parametrize(
    "precision, phrase",
    [("bf16", "precision bf16 cannot run here: this CPU (AMD EPYC) has no native bf16"),
     ("fp16", "precision fp16 cannot run here: fp16 runs on CUDA only"),
     ("int8", "precision int8 cannot run here:"),
     ("fp8", "precision 'fp8' is unknown; choose one of auto, fp32, bf16, fp16, int8")],
)  # fmt: skip
def test_a_mode_the_machine_cannot_run_is_one_line(precision, phrase, tmp_path):
    with pytest.raises(PrecisionUnavailableError) as error:
        choose_precision(precision, "cpu", tmp_path / "model_int8.onnx", info=AVX2_EPYC)
    message = str(error.value)
    assert phrase in message and "\n" not in message
    if precision == "int8":
        assert "model_int8.onnx not found" in message and "custom_nets.deploy quantize" in message


def test_explicit_requests_that_fit_are_kept():
    assert choose_precision("fp32", "cpu", info=AVX2_EPYC) == ("fp32", "requested")
    assert choose_precision("bf16", "cpu", info=AMX_XEON) == ("bf16", "requested")


def _small_net() -> AdaptiveCENet:
    torch.manual_seed(0)
    return AdaptiveCENet(spatial_dims=2, in_channels=1, out_channels=2).eval()


def test_fp32_fast_forward_equals_eager_network():
    net, x = _small_net(), torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = net(x)
    fast = FastForward(_small_net(), "fp32", "cpu")
    out = fast(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_bf16_fast_forward_runs_in_bfloat16_and_returns_float32():
    # oneDNN runs bf16 on any x86 CPU (emulated without AMX/AVX512-BF16): the path itself is checked everywhere
    seen: list[torch.dtype] = []
    net = _small_net()
    handle = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
        lambda module, args, output: seen.append(output.dtype)
    )
    out = FastForward(net, "bf16", "cpu")(torch.rand(1, 1, 64, 64))
    handle.remove()
    assert torch.bfloat16 in seen and out.dtype == torch.float32


def test_fast_network_logs_the_path_and_why(caplog, tmp_path):
    with caplog.at_level("INFO", logger="custom_nets.engines.fast_path"):
        fast_network(_small_net(), "fp32", "cpu", tmp_path / "model_int8.onnx")
    assert any(r.getMessage().startswith("inference path: fp32 (PyTorch, channels_last): requested") for r in caplog.records)
