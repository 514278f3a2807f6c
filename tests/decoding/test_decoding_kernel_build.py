"""The CPU kernel's source is a file built on first use, in a folder named by a hash of the source."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from satic.cli import main as satic_main
from satic.data.vocab import Vocabulary
from satic.decoding.small_gemm import build_directory, build_problem, source_text
from satic.model import ModelConfig, SATModel
from satic.model.checkpoint import save_checkpoint

from processes import AS_NOBODY, nobody_runs_satic


def test_build_folder_follows_the_source(tmp_path):
    source = source_text()
    assert build_directory(source, tmp_path) == build_directory(source, tmp_path)
    assert build_directory(source, tmp_path).parent == tmp_path
    assert build_directory(source + "// changed\n", tmp_path) != build_directory(source, tmp_path)
    assert "TORCH_LIBRARY(satic_small_gemm" in source  # the package ships the source file


def test_torch_extensions_dir_moves_the_build(tmp_path, monkeypatch):
    """$TORCH_EXTENSIONS_DIR, torch's own setting for where extensions build (a read-only home, a shared
    machine), is honoured as torch honours it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build_directory(source_text()).parent == tmp_path / "ext"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert build_directory(source_text()).parent != tmp_path / "ext"


@pytest.mark.skipif(build_problem() is not None, reason=f"the kernel cannot be built here: {build_problem()}")
def test_build_kernels_prints_where_and_how_long(capsys):
    assert satic_main(["build-kernels"]) == 0
    printed = capsys.readouterr().out
    match = re.fullmatch(r"small-row kernel ready in (.+) \((\d+\.\d) s\)\n", printed)
    assert match, printed
    assert Path(match[1]) == build_directory(source_text()) and Path(match[1]).is_dir()


@pytest.mark.skipif(build_problem() is not None, reason=f"the kernel cannot be built here: {build_problem()}")
def test_importing_and_loading_a_captioner_builds_nothing(tmp_path):
    config = ModelConfig(vocab_size=3, num_layers=1, d_model=16, d_ff=32, num_heads=2, att_feat_size=8)
    checkpoint = save_checkpoint(tmp_path / "ckpt", SATModel(config), Vocabulary(("a", "b", "c")))
    extensions = tmp_path / "extensions"  # empty: a build would have to write here
    script = ("import sys; from satic.captioner import Captioner; "
              "from satic.decoding.small_gemm import SmallRowLinear; "
              "c = Captioner.load(sys.argv[1]); assert isinstance(c.model.generator, SmallRowLinear)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run([sys.executable, "-c", script, str(checkpoint)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not extensions.exists() or not any(extensions.iterdir())


@pytest.mark.skipif(build_problem() is not None, reason=f"the kernel cannot be built here: {build_problem()}")
def test_a_compiler_without_openmp_gets_the_single_threaded_build(tmp_path):
    """The threaded build fails (here: a flag the compiler refuses stands in for -fopenmp), so the kernel is
    built without it and works; the next process loads that build at once and does not retry the other."""
    script = """if True:
        import sys, time
        import torch
        import satic.decoding.small_gemm as kernel
        kernel.THREADED = ("-fno-such-satic-flag",)
        start = time.perf_counter()
        assert kernel.load_kernel() is None, kernel.load_kernel()
        source = kernel.source_text()
        threaded, single = (kernel.build_directory(source, threaded=t) for t in (True, False))
        assert (threaded / kernel.FAILED).exists() and not (threaded / kernel.BUILT).exists()
        assert kernel.built_directory(source) == single and (single / kernel.BUILT).exists()
        x, linear = torch.randn(3, 40), torch.nn.Linear(40, 24)
        out = torch.ops.satic_small_gemm.linear(x, kernel.pack_weight(linear.weight.detach()),
                                                kernel.padded_bias(linear, 2), 24)
        torch.testing.assert_close(out, linear(x).detach())
        print(f"{time.perf_counter() - start:.1f}")
    """
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert float(second.stdout.split()[-1]) < 5  # loaded, not built again


@pytest.mark.skipif(build_problem() is not None, reason=f"the kernel cannot be built here: {build_problem()}")
def test_a_build_killed_half_way_does_not_hold_up_the_next(tmp_path, unfinished_build):
    """A process killed while it built the kernel (SIGKILL, out of memory) leaves torch's lock file in the build
    folder, which torch's loader alone would wait on for ever: the next process finishes the build."""
    import satic.decoding.small_gemm as kernel

    folder = unfinished_build(tmp_path)  # killed once its objects were compiled, before the library was linked
    assert folder == build_directory(source_text(), tmp_path, threaded=True)  # the first build tried
    (folder / "lock").touch()  # torch's lock file, as the killed process left it
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "satic", "build-kernels"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / kernel.BUILT).exists() and not (folder / "lock").exists()


def test_a_broken_compiler_is_not_taken_for_one_without_openmp(tmp_path, monkeypatch):
    """A compiler that fails the threaded and the single-threaded build alike (CXX=false, a broken install) is
    not missing OpenMP: nothing records the threaded build as failed, so once the compiler is fixed the next
    process builds the threaded kernel, not the single-threaded one for good."""
    import torch.utils.cpp_extension as extension

    import satic.decoding.small_gemm as kernel

    tried = []

    def broken(name, **kwargs):
        tried.append(kernel.THREADED[0] in kwargs["extra_cflags"])
        raise subprocess.CalledProcessError(1, ["false", "--version"])

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(extension, "load", broken)
    reason = kernel._load.__wrapped__()  # not the cached answer of this process
    assert tried == [True, False] and reason.startswith("building the small-row kernel failed (CalledProcessError")
    assert not (kernel.build_directory(kernel.source_text(), threaded=True) / kernel.FAILED).exists()
    kernel._load.__wrapped__()
    assert tried == [True, False] * 2  # the threaded build is tried again


def caption_with_kernel_cache_at(folder: Path, extensions: Path, as_nobody: bool) -> subprocess.CompletedProcess:
    """A fresh process captions with a tiny checkpoint in `folder`, its kernel cache at `extensions`."""
    config = ModelConfig(vocab_size=3, num_layers=1, d_model=16, d_ff=32, num_heads=2, att_feat_size=8)
    checkpoint = save_checkpoint(folder / "ckpt", SATModel(config), Vocabulary(("a", "b", "c")))
    features = folder / "feats.npy"
    np.save(features, np.ones((1, 4, 8), np.float32))
    for path in (folder, checkpoint, *checkpoint.iterdir(), features):  # readable by user nobody
        path.chmod(0o755 if path.is_dir() else 0o644)
    script = ("import sys, numpy as np; from satic.captioner import Captioner\n"
              "print(Captioner.load(sys.argv[1]).caption(np.load(sys.argv[2])))")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([*(AS_NOBODY if as_nobody else []), sys.executable, "-c", script, str(checkpoint),
                           str(features)], env=env, capture_output=True, text=True, cwd="/")


def test_a_build_folder_that_cannot_be_made_falls_back_with_one_warning(tmp_path):
    """The kernel cache under a file: captions are still made, with torch's layers, and one warning says
    why and what to set."""
    (tmp_path / "file").write_text("not a folder")
    done = caption_with_kernel_cache_at(tmp_path, tmp_path / "file" / "extensions", as_nobody=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("[") and "Traceback" not in done.stderr
    assert "building the small-row kernel failed (NotADirectoryError" in done.stderr
    assert "set TORCH_EXTENSIONS_DIR to a folder you can write" in done.stderr


@pytest.mark.skipif(not nobody_runs_satic(), reason="needs root, setpriv and a checkout other users can read")
def test_a_build_folder_the_user_cannot_enter_falls_back_with_one_warning():
    """The kernel cache in a folder the user may not enter (another user's home)."""
    with tempfile.TemporaryDirectory() as folder:  # pytest's own folders are root's alone
        closed = Path(folder) / "closed"
        closed.mkdir(mode=0o700)  # root's: user nobody cannot enter it
        done = caption_with_kernel_cache_at(Path(folder), closed / "extensions", as_nobody=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("[") and "Traceback" not in done.stderr
    assert "building the small-row kernel failed (PermissionError" in done.stderr
    assert "set TORCH_EXTENSIONS_DIR to a folder you can write" in done.stderr


def test_ninja_beside_the_interpreter_counts_when_the_environment_is_not_activated(tmp_path):
    """pip installs ninja into the environment's bin/, which is not on PATH for `.venv/bin/python -m satic`."""
    for folder in ("path", "env/bin", "ext"):
        (tmp_path / folder).mkdir(parents=True)
    for tool in ("path/c++", "env/bin/ninja"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    script = """if True:
        import os, sys
        import satic.decoding.small_gemm as kernel
        sys.executable = sys.argv[1]
        print(kernel.build_problem())
        os.unlink(sys.argv[2])  # the environment without its ninja
        print(kernel.build_problem())
    """
    env = {**{k: v for k, v in os.environ.items() if k != "CXX"}, "PATH": str(tmp_path / "path"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": os.pathsep.join(sys.path)}
    if build_problem() is not None and "ninja" not in build_problem():  # not an x86-64 CPU with AVX2
        pytest.skip(f"the kernel cannot be built here: {build_problem()}")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "env/bin/python"),
                           str(tmp_path / "env/bin/ninja")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["None", "building the small-row kernel needs ninja (pip install ninja)"]


def test_the_build_path_without_a_path_variable_keeps_the_default_one(monkeypatch):
    from satic.decoding.small_gemm import tool_path

    monkeypatch.delenv("PATH", raising=False)
    monkeypatch.setattr(sys, "executable", "/opt/env/bin/python")
    assert tool_path() == os.pathsep.join((os.defpath, "/opt/env/bin"))
    monkeypatch.setenv("PATH", "/usr/bin:/opt/env/bin")
    assert tool_path() == "/usr/bin:/opt/env/bin"  # already there: unchanged


def test_a_cpu_without_avx2_or_neon_keeps_torchs_linear_unless_asked(tmp_path):
    """The portable vectors compiled without FMA instructions call libm's fmaf per lane, far slower than torch's
    linear: an x86-64 CPU without AVX2 (or an AVX2 CPU with ATen held to its default kernels) keeps torch's
    layers; SATIC_PORTABLE_SIMD=1 builds the portable kernel anyway. arm64 builds the NEON one."""
    script = """if True:
        import os, platform, sys
        import satic.decoding.small_gemm as kernel
        kernel.has_avx2 = lambda: False
        for case in sys.argv[1:]:  # MACHINE or MACHINE:SATIC_PORTABLE_SIMD
            machine, _, portable = case.partition(":")
            platform.machine = lambda: machine
            if portable:
                os.environ["SATIC_PORTABLE_SIMD"] = portable
            else:
                os.environ.pop("SATIC_PORTABLE_SIMD", None)
            print(kernel.build_problem())
    """
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SATIC_PORTABLE_SIMD", None)
    done = subprocess.run([sys.executable, "-c", script, "x86_64", "x86_64:1", "aarch64"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    plain, portable, arm64 = done.stdout.splitlines()
    assert plain == ("the kernel's vectors are AVX2 or NEON, and this x86_64 CPU has neither; its portable build "
                     "would be slower than torch's linear here (SATIC_PORTABLE_SIMD=1 builds it anyway)")
    assert "has neither" not in portable
    assert "has neither" not in arm64


def test_preparing_a_model_where_the_kernel_cannot_be_built_warns_once_with_the_reason(tmp_path):
    """No C++ compiler and no kernel built before: preparing a model for decoding says why, once per process, and
    the copy decodes with torch's layers; kernel='torch' and bf16, which never use the kernel, say nothing."""
    script = """if True:
        import warnings
        from satic.decoding import prepare_for_inference
        from satic.model import ModelConfig, SATModel
        model = SATModel(ModelConfig(vocab_size=8, num_layers=1, d_model=16, d_ff=16, num_heads=2, att_feat_size=8))
        for precision, kernel in (("fp32", "torch"), ("bf16", "auto"), ("fp32", "auto"), ("int8", "auto")):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prepare_for_inference(model, precision, kernel)
            print(precision, kernel, len(caught), *[str(w.message) for w in caught], sep=" | ")
    """
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "no-such-c++",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    reason = build_problem() or ""  # a CPU the kernel does not build for says so before the compiler is looked for
    if "AVX2 or NEON" not in reason:
        reason = "building the small-row kernel needs a C++ compiler ('no-such-c++' is not on PATH)"
    assert done.stdout.splitlines() == ["fp32 | torch | 0", "bf16 | auto | 0", f"fp32 | auto | 1 | {reason}; decoding "
                                        "uses torch's linear layers (slower at batch 1)", "int8 | auto | 0"]
