"""Compile every Triton kernel for GPUs that are not here, and read what the compiler made of it.

``triton.compile`` runs the whole pipeline down to a cubin with the ``ptxas`` the triton wheel ships,
no GPU needed; ``cuobjdump -res-usage`` then gives registers, stack (spilled registers) and static
shared memory, and ``nvdisasm`` the SASS, in which the dot instruction shows: ``HGMMA`` (Hopper
warp-group MMA), ``HMMA`` (tensor-core MMA), or ``FFMA`` only (no tensor cores: fp32 IEEE dots).

Every case that the code can launch on a GPU is listed by :func:`cases`: each kernel x activation
dtype x bit width x block configuration of :mod:`.configs` (the fused ones also at each LoRA rank
specialisation of :data:`RANK_SPECIALISATIONS`), with the K tile inside one quantization
group (the GPU launchers only choose such configurations; the gathered-scales variant runs under the
interpreter's tests). Arguments get the hints a real launch gets (16-byte-aligned pointers; N, K and
the group size divisible by 16).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .configs import DEQUANT, Blocks, fused_configs
from .packing import SUPPORTED_BITS

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
# Largest shared memory one block may use (opt-in dynamic limit): A100 and H100 data sheets / CUDA guide.
SHARED_LIMIT_BYTES = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# No kernel may spill: a spill is a local-memory round trip inside the K loop of a memory-bound kernel.
SPILL_BUDGET_BYTES = 0
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass(frozen=True)
class Case:
    """One kernel build: which kernel, activations' dtype, bit width and block configuration."""

    kernel: str
    dtype: str
    bits: int
    blocks: Blocks
    rank: int = 16  # the LoRA rank R (fused kernels): a runtime loop bound, specialised on R % 16 == 0

    @property
    def label(self) -> str:
        b = self.blocks
        rank = f" r{self.rank}" if self.kernel != "dequantize" else ""
        return (f"{self.kernel} {self.dtype} int{self.bits} {b.block_m}x{b.block_n}x{b.block_k} "
                f"w{b.num_warps}s{b.num_stages}{rank}")


@dataclass
class Build:
    """What the compiler produced for one case and target."""

    case: Case
    target: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    dot: str
    instructions: dict[str, int]


# The fused kernels loop over the rank R in chunks of their tile width: R is a runtime loop bound, which enters a
# build only through Triton's specialisation of R % 16 == 0. So rank 16 compiles to the same code as every
# multiple of 16 (64, 128, 256, 512: what rank_allocation: budget gives with rank_max_factor up to 4 x 128), and
# 200 stands for every other rank.
RANK_SPECIALISATIONS = (16, 200)


def cases() -> list[Case]:
    """Every build the code can launch: every kernel x dtype x bit width x block configuration at rank 16,
    and the other rank specialisation of :data:`RANK_SPECIALISATIONS` for every fused configuration at 4 bits
    (the bit width only changes the weight tile, not the LoRA loop)."""
    fused = ("fused_forward", "fused_grad_input")
    out = [Case("dequantize", dtype, bits, blocks) for dtype in DTYPES for bits in SUPPORTED_BITS for blocks in DEQUANT]
    out += [Case(kernel, dtype, bits, blocks) for kernel in fused
            for dtype, torch_dtype in DTYPES.items() for bits in SUPPORTED_BITS for blocks in fused_configs(torch_dtype)]
    out += [Case(kernel, dtype, 4, blocks, rank) for kernel in fused for dtype, torch_dtype in DTYPES.items()
            for blocks in fused_configs(torch_dtype) for rank in RANK_SPECIALISATIONS if rank != 16]
    return out


def _source(case: Case) -> ASTSource:
    from . import dequant, fused

    t = case.dtype
    b = case.blocks
    if case.kernel == "dequantize":
        fn = dequant._dequant_kernel
        signature = {"qweight_ptr": "*i32", "scales_ptr": f"*{t}", "zeros_ptr": "*u8", "out_ptr": f"*{t}", "N": "i32",
                     "K": "i32", "group_size": "i32"}
        constants = {"BITS": case.bits, "BLOCK_K": b.block_k, "BLOCK_N": b.block_n, "ONE_GROUP": True}
    elif case.kernel == "fused_forward":
        fn = fused._fused_forward_kernel
        signature = {"x_ptr": f"*{t}", "qweight_ptr": "*i32", "scales_ptr": f"*{t}", "zeros_ptr": "*u8", "u_ptr": f"*{t}",
                     "b_ptr": f"*{t}", "bias_ptr": f"*{t}", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                     "R": "i32", "group_size": "i32", "SPLIT": "i32"}
        constants = {"HAS_BIAS": True, "BITS": case.bits, "IEEE": case.dtype == "fp32", "ONE_GROUP": True, **b.meta()}
    else:
        fn = fused._fused_grad_input_kernel
        signature = {"dy_ptr": f"*{t}", "qweight_ptr": "*i32", "scales_ptr": f"*{t}", "zeros_ptr": "*u8", "g_ptr": f"*{t}",
                     "a_ptr": f"*{t}", "dx_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                     "group_size": "i32", "SPLIT": "i32"}
        constants = {"BITS": case.bits, "IEEE": case.dtype == "fp32", "ONE_GROUP": True, **b.meta()}
    signature.update({name: "constexpr" for name in constants})
    divisible = [name for name, kind in signature.items() if kind.startswith("*") or name in ("N", "K", "group_size")
                 or (name == "R" and case.rank % 16 == 0)]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def _run(tool: str, *args: str) -> str:
    return subprocess.run([os.path.join(_BIN, tool), *args], capture_output=True, text=True, check=True).stdout


def compile_case(case: Case, target: str) -> Build:
    """Compile ``case`` for ``target`` (``sm_80`` / ``sm_90``) and read its resources and dot instruction."""
    compiled = triton.compile(_source(case), target=TARGETS[target],
                              options={"num_warps": case.blocks.num_warps, "num_stages": case.blocks.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
    try:
        usage = _run("cuobjdump", "-res-usage", handle.name)
        sass = _run("nvdisasm", "-c", handle.name)
    finally:
        os.unlink(handle.name)
    numbers = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    counts = collections.Counter(re.findall(r"\b(HGMMA|HMMA|FFMA|LDL|STL)\b", sass))
    dot = "HGMMA" if counts["HGMMA"] else "HMMA" if counts["HMMA"] else "FFMA" if counts["FFMA"] else "-"
    return Build(case, target, registers=int(numbers["REG"]),
                 spill_bytes=int(numbers.get("STACK", 0)) + int(numbers.get("LOCAL", 0)),
                 shared_bytes=int(compiled.metadata.shared) + int(numbers.get("SHARED", 0)),
                 dot=dot, instructions=dict(counts))


def problems(build: Build) -> list[str]:
    """What is wrong with a build: spills over budget, shared memory over the target's limit, a dot that
    misses the tensor cores (fp16/bf16) or uses them with reduced precision (fp32 must stay IEEE)."""
    found = []
    if build.spill_bytes > SPILL_BUDGET_BYTES:
        found.append(f"spills {build.spill_bytes} bytes (budget {SPILL_BUDGET_BYTES})")
    if build.instructions.get("LDL") or build.instructions.get("STL"):
        found.append(f"local-memory loads/stores in the SASS ({build.instructions})")
    if build.shared_bytes > SHARED_LIMIT_BYTES[build.target]:
        found.append(f"shared memory {build.shared_bytes} > {SHARED_LIMIT_BYTES[build.target]} on {build.target}")
    if build.case.kernel != "dequantize":
        if build.case.dtype in ("fp16", "bf16") and build.dot not in ("HMMA", "HGMMA"):
            found.append(f"{build.case.dtype} dots run as {build.dot}, not on the tensor cores")
        if build.case.dtype == "fp32" and build.dot != "FFMA":
            found.append(f"fp32 dots run as {build.dot}: TF32 on the tensor cores instead of IEEE fp32")
    return found


def _compile_pair(pair: tuple[Case, str]) -> Build:
    return compile_case(*pair)


def compile_all(targets: tuple[str, ...] = tuple(TARGETS), workers: int | None = None) -> list[Build]:
    """Every case of :func:`cases` for every target, compiled in ``workers`` fresh processes (default: the CPUs)."""
    import concurrent.futures
    import multiprocessing

    pairs = [(case, target) for case in cases() for target in targets]
    # The compiler needs Triton's JIT functions, not the interpreter's stand-ins that the CPU tests ask for
    # with TRITON_INTERPRET=1, read when triton is imported: the workers start without it.
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:
            results = pool.map(_compile_pair, pairs)  # submits everything: the workers start now
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        return list(results)
