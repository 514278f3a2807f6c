"""The kernels' vector layer (csrc/simd.h) gives the same bits in each of its builds: AVX2, NEON and portable C++.

simd_check.cpp prints every operation's result lanes on fixed inputs (NaN, infinities, -0.0, denormals, ties,
int16 saturation); each build must print the same lines. The whole kernel library built with the portable
vectors must then give what the AVX2 build gives, to the bit, on linear layers, norms and native decoding."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from satic.decoding.small_gemm import AVX2_FLAGS, BASE_FLAGS, CSRC, build_problem, has_avx2, is_arm64

CHECK = Path(__file__).with_name("simd_check.cpp")
CXX = os.environ.get("CXX", "c++")


def checker_output(tmp_path: Path, name: str, compiler: list[str], flags: tuple[str, ...], run: list[str]) -> str:
    binary = tmp_path / name
    subprocess.run([*compiler, "-std=c++17", *BASE_FLAGS, *flags, f"-I{CSRC}", str(CHECK), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return subprocess.run([*run, str(binary)], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX})")
def test_the_portable_vectors_give_the_native_ones_bits(tmp_path):
    native = checker_output(tmp_path, "native", [CXX], AVX2_FLAGS if has_avx2() else (), [])
    portable = checker_output(tmp_path, "portable", [CXX], ("-DSATIC_PORTABLE_SIMD", "-Wno-psabi"), [])
    assert native.splitlines()[0] == f"backend {'avx2' if has_avx2() else 'neon' if is_arm64() else 'portable'}"
    assert portable.splitlines()[0] == "backend portable"
    assert len(native.splitlines()) > 2000
    assert native.splitlines()[1:] == portable.splitlines()[1:]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs an arm64 cross compiler (aarch64-linux-gnu-g++) and qemu-aarch64")
def test_the_neon_vectors_give_the_portable_ones_bits(tmp_path):
    arm = ["aarch64-linux-gnu-g++", "-static"]
    neon = checker_output(tmp_path, "neon", arm, (), ["qemu-aarch64"])
    portable = checker_output(tmp_path, "portable", arm, ("-DSATIC_PORTABLE_SIMD",), ["qemu-aarch64"])
    assert neon.splitlines()[0] == "backend neon" and portable.splitlines()[0] == "backend portable"
    assert neon.splitlines()[1:] == portable.splitlines()[1:]


def kernel_outputs() -> dict[str, torch.Tensor]:
    """The loaded kernel's outputs on fixed inputs: linear layers (fp32 and int8, 1..13 rows, widths that leave
    tails), norms, and native greedy, sampled, beam and diverse decoding of fp32 and int8 models and an ensemble."""
    from satic.decoding import DecodeOptions, Decoder, Ensemble, decode
    from satic.decoding.small_gemm import FusedReferenceNorm, Int8WeightLinear, SmallRowLinear, load_kernel
    from satic.model import ModelConfig, SATModel
    from satic.model.layers import LayerNorm

    assert load_kernel() is None
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        for rows in (1, 2, 5, 13):
            for inputs, outputs in ((37, 21), (64, 48), (130, 17)):
                torch.manual_seed(rows * 1000 + inputs)
                linear = torch.nn.Linear(inputs, outputs)
                x = torch.randn(rows, inputs, generator=g) * 3
                out[f"linear {rows} {inputs} {outputs}"] = SmallRowLinear(linear)(x)
                x[0, ::3] = float("nan") if rows > 1 else x[0, ::3]
                out[f"int8 {rows} {inputs} {outputs}"] = Int8WeightLinear(linear)(x)
            for n in (2, 13, 64):
                norm = LayerNorm(n)
                norm.weight.copy_(torch.randn(n, generator=g))
                norm.bias.copy_(torch.randn(n, generator=g))
                out[f"norm {rows} {n}"] = FusedReferenceNorm(norm)(torch.randn(rows, n, generator=g) * 5)
        options = {"greedy": DecodeOptions(max_length=12), "beam": DecodeOptions(max_length=12, beam_size=3),
                   "diverse": DecodeOptions(max_length=12, beam_size=4, beam_groups=2, diversity_lambda=0.5),
                   "trigrams": DecodeOptions(max_length=12, beam_size=2, block_trigrams=True),
                   "sample": DecodeOptions(max_length=12, sample_method="sample", sample_n=2, temperature=0.8)}
        feats = torch.randn(2, 11, 40, generator=g)
        masks = torch.ones(2, 11, dtype=torch.bool)
        masks[1, 6:] = False
        models = []
        for k in (1, 2):
            torch.manual_seed(k)
            models.append(SATModel(ModelConfig(vocab_size=45, group_size=k, num_layers=2, d_model=64, d_ff=96,
                                               num_heads=4, att_feat_size=40, max_positions=40)).eval())
        torch.manual_seed(3)
        partner = SATModel(models[1].config).eval()
        decoders = {f"K={m.config.group_size} {precision}": Decoder.prepare(m, precision, compile=True)
                    for m in models for precision in ("fp32", "int8")}
        decoders["ensemble"] = Ensemble([decoders["K=2 fp32"], Decoder.prepare(partner, compile=True)], [1.0, 2.0])
        for name, decoder in decoders.items():
            for option, opts in options.items():
                torch.manual_seed(5)
                result = decode(decoder, feats, masks, opts)
                out[f"{name} {option} seq"], out[f"{name} {option} logprobs"] = result.seq, result.logprobs
    return out


@pytest.mark.skipif(build_problem() is not None, reason=f"the kernel cannot be built here: {build_problem()}")
def test_the_kernels_built_with_portable_vectors_give_the_same_bits(tmp_path):
    """The portable build in a fresh process (its own build folder, cached like the other) against this one's."""
    script = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from test_decoding_simd import kernel_outputs; "
              "torch.save(kernel_outputs(), sys.argv[2])")
    env = {**os.environ, "SATIC_PORTABLE_SIMD": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path / "portable.pt")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    portable = torch.load(tmp_path / "portable.pt", weights_only=True)
    native = kernel_outputs()
    assert portable.keys() == native.keys() and len(native) > 80
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)

    different = [name for name in native if not torch.equal(bits(native[name]), bits(portable[name]))]
    assert not different, different
