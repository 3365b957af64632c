"""Reading compiled GPU code without a GPU: SASS listings (``cuobjdump -sass``) and ptxas ``-v`` logs.

Shared by the static checks of the Triton kernels (``softvq_kernels.triton.static_check``) and of the CUDA
C++ backend (``softvq_kernels.cuda.static_check``); imports nothing heavy, so the tests run it in-process.

Spills inside loops: a loop body is the address range [target, branch] of a backward branch (``BRA`` to a
lower or equal address); a spill store / load (STL / LDL: local memory, which in these kernels holds only
spilled registers) inside such a range costs memory traffic every iteration, one outside costs it once.
"""

from __future__ import annotations

import re
from pathlib import Path

_ADDRESS = r"/\*([0-9a-f]{4,})\*/"
_PREDICATE = r"(?:@!?U?P[T0-9]+\s+)?"
_BRANCH = re.compile(_ADDRESS + r"\s+" + _PREDICATE + r"BRA(?:\.[A-Z.]+)?\s+(?:`\()?0x([0-9a-f]+)")
_SPILL = re.compile(_ADDRESS + r"\s+" + _PREDICATE + r"(STL|LDL)\b")
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UTMAREDG")
# ptxas warnings that a wgmma pipeline was serialised: C7510 (across a call), C7515 (accumulator registers
# written by non-wgmma instructions), and the other C75xx reasons ptxas gives for the same effect.
WGMMA_SERIALISED = re.compile(r"\(C75(?:0[89]|1[0-9])\)|wgmma\.mma_async instructions are serialized")


def loop_ranges(sass: str) -> list[tuple[int, int]]:
    """[(first, last)] address ranges of the loop bodies of one function: every backward branch closes one."""
    ranges = []
    for match in _BRANCH.finditer(sass):
        at, target = int(match.group(1), 16), int(match.group(2), 16)
        if target <= at:
            ranges.append((target, at))
    return ranges


def sass_counts(sass: str) -> dict[str, int]:
    """Instruction counts of one function: spills (all / inside a loop), loops, HGMMA, HMMA, TMA."""
    loops = loop_ranges(sass)
    spills = [int(m.group(1), 16) for m in _SPILL.finditer(sass)]
    return {
        "spill_instrs": len(spills),
        "spill_instrs_in_loops": sum(any(lo <= at <= hi for lo, hi in loops) for at in spills),
        "loops": len(loops),
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "tma": len(re.findall(r"\b(?:" + "|".join(TMA_OPCODES) + r")\b", sass)),
    }


def sass_by_function(listing: str) -> dict[str, str]:
    """A ``cuobjdump -sass`` listing split into {function name: its SASS}."""
    out = {}
    for block in re.split(r"\n\s*Function : ", listing)[1:]:
        name, _, body = block.partition("\n")
        out[name.strip()] = body
    return out


def ptxas_by_function(log: str) -> dict[str, dict]:
    """ptxas -v figures per entry function: registers, spill bytes per thread, serialisation warnings."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for 'sm_\w+'", line)
        if entry:
            current = out.setdefault(entry.group(1), {"regs": None, "spill_store_bytes": 0, "spill_load_bytes": 0,
                                                      "wgmma_serialized": []})
            continue
        if current is None:
            continue
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        regs = re.search(r"Used (\d+) registers", line)
        if spill:
            current["spill_store_bytes"], current["spill_load_bytes"] = int(spill.group(1)), int(spill.group(2))
        if regs:
            current["regs"] = int(regs.group(1))
            current = None  # the entry's figures end here; device-function properties follow in some logs
    for line in log.splitlines():  # the warnings name the function they concern
        if WGMMA_SERIALISED.search(line):
            for name, figures in out.items():
                if f"'{name}'" in line or name in line:
                    figures["wgmma_serialized"].append(line.strip())
    return out


def triton_tool(name: str) -> str | None:
    """cuobjdump / nvdisasm / ptxas shipped in the triton wheel (CI has them without a CUDA toolkit)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else None
