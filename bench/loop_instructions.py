"""Static instruction counts of the loops in a kernel: PTX (kept by ``compile_check.py --keep``)
and the SASS ptxas makes of it.

    python bench/loop_instructions.py KERNEL.ptx [...]

Per file and per loop (a natural loop of the control-flow graph: a back edge to a block that
dominates it), outermost first: the header label, its depth, the instructions of the loop with
its inner loops counted once (``all``) and without them (``own``). Instructions are PTX lines
ending in ``;`` that are not declarations (inline-asm lines count), or SASS instruction lines
(``/*addr*/ OPCODE ...;``, NOPs excluded). SASS needs ``ptxas`` (nvidia-cuda-nvcc-cu12) and
``nvdisasm`` (shipped in triton's ``backends/nvidia/bin``); without them only PTX is counted.
A static count: a loop body that branches (the save-time loop, rejected steps) counts every
path once.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

PTX_LABEL = re.compile(r"^(\$L\w+):")
PTX_BRANCH = re.compile(r"^\s*(@!?%p\d+\s+)?bra(\.uni)?\s+(\$L\w+);")
SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
SASS_INSN = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);")
SASS_BRANCH = re.compile(r"\bBRA\s+`\((\.L_x_\d+)\)")


def blocks(lines: list, sass: bool):
    """[(label, instruction count, successors)] in layout order."""
    out = [["<entry>", 0, [], True]]  # label, count, targets, falls through
    for line in lines:
        label = (SASS_LABEL if sass else PTX_LABEL).match(line)
        if label:
            out.append([label.group(1), 0, [], True])
            continue
        if sass:
            insn = SASS_INSN.match(line)
            if not insn or insn.group(2) == "NOP":
                continue
            op, predicated = insn.group(2), bool(insn.group(1))
            target = SASS_BRANCH.search(line)
            terminal = op in ("BRA", "EXIT", "RET", "BRX", "JMP") and not predicated
        else:
            text = line.split("//")[0].strip()
            if not text.endswith(";") or text.startswith((".", "{", "}")):
                continue
            op = text.split()[0]
            predicated = op.startswith("@")
            target = PTX_BRANCH.match(text)
            target = re.match(r".*?(\$L\w+);", text) if target else None
            terminal = (text.split()[-2 if predicated else 0].startswith("bra") and not predicated) or op == "ret;"
        block = out[-1]
        if not block[3]:  # an instruction after an unconditional branch starts a new block
            out.append([f"<after {block[0]}>", 0, [], True])
            block = out[-1]
        block[1] += 1
        if target:
            block[2].append(target.group(1))
        if terminal:
            block[3] = False
    index = {b[0]: i for i, b in enumerate(out)}
    succ = []
    for i, (label, count, targets, falls) in enumerate(out):
        s = [index[t] for t in targets if t in index]
        if falls and i + 1 < len(out):
            s.append(i + 1)
        succ.append(s)
    return [(b[0], b[1]) for b in out], succ


def loops(lines: list, sass: bool):
    """[(header, depth, all, own)] per natural loop, outermost first."""
    info, succ = blocks(lines, sass)
    n = len(info)
    pred = [[] for _ in range(n)]
    for i, s in enumerate(succ):
        for j in s:
            pred[j].append(i)
    dom = [set(range(n)) for _ in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for i in range(1, n):
            new = {i} | (set.intersection(*(dom[p] for p in pred[i])) if pred[i] else set())
            if new != dom[i]:
                dom[i], changed = new, True
    bodies = {}
    for tail in range(n):
        for head in succ[tail]:
            if head in dom[tail]:  # a back edge
                body, stack = {head}, []
                if tail != head:
                    body.add(tail)
                    stack.append(tail)
                while stack:
                    b = stack.pop()
                    for p in pred[b]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                bodies[head] = bodies.get(head, set()) | body
    out = []
    for head, body in bodies.items():
        depth = sum(1 for other, ob in bodies.items() if other != head and body < ob)
        inner = set().union(*(ob for other, ob in bodies.items() if other != head and ob < body))
        out.append((info[head][0], depth, sum(info[b][1] for b in body), sum(info[b][1] for b in body - inner)))
    return sorted(out, key=lambda r: (r[1], -r[2]))


def sass_of(ptx: str) -> list | None:
    import jax

    site = os.path.dirname(os.path.dirname(jax.__file__))
    ptxas = os.path.join(site, "nvidia", "cuda_nvcc", "bin", "ptxas")
    ptxas = ptxas if os.path.exists(ptxas) else shutil.which("ptxas")
    nvdisasm = next(iter(glob.glob(os.path.join(site, "triton", "backends", "nvidia", "bin", "nvdisasm"))), None)
    nvdisasm = nvdisasm or shutil.which("nvdisasm")
    if not (ptxas and nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run([ptxas, "-arch=sm_90a", ptx, "-o", cubin], check=True, capture_output=True)
        return subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout.splitlines()


def main(paths: list) -> int:
    for path in paths:
        print(os.path.basename(path))
        listings = [("PTX", open(path).read().splitlines(), False)]
        sass = sass_of(path)
        if sass is not None:
            listings.append(("SASS", sass, True))
        for kind, lines, is_sass in listings:
            for header, depth, total, own in loops(lines, is_sass):
                print(f"  {kind:4} loop {header:14} depth {depth}: all {total:5}, own {own:5}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
