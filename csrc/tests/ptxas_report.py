"""ptxas resource use of every CUDA kernel in csrc/ (registers, shared memory, stack, spills), per architecture.

    python csrc/tests/ptxas_report.py            # table; exit 1 if a kernel spills or outgrows its budget
    python csrc/tests/ptxas_report.py --update   # rewrite csrc/tests/ptxas_budget.json from this compile
    python csrc/tests/ptxas_report.py --json out.json

Each .cu is compiled alone (no torch headers) with the extension's nvcc flags (setup.py) and `-Xptxas -v`.
The budget holds, per kernel and architecture, the registers measured when it was last reviewed: more registers
than that (occupancy drops) or any spill (local-memory traffic in the hot loop) fails, so such a change is seen.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUDGET = os.path.join(ROOT, "csrc", "tests", "ptxas_budget.json")
ARCHS = ("80", "90")
FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-std=c++17", "-DNDEBUG"]


def find_nvcc():
    for home in [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def short_name(demangled):
    """'void smtc::sinkhorn::(anonymous namespace)::sinkhorn_forward_kernel<float>(float const*, ...)' ->
    'sinkhorn::sinkhorn_forward_kernel<float>'."""
    name = demangled.replace("(anonymous namespace)::", "").replace("smtc::", "")
    name = name[5:] if name.startswith("void ") else name
    return name.split("(")[0].strip()


def compile_report(nvcc, source, arch):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *FLAGS, "-I", os.path.join(ROOT, "csrc"), f"-gencode=arch=compute_{arch},code=sm_{arch}",
               "-Xptxas", "-v", "-c", source, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"nvcc failed on {source}:\n{res.stderr[-3000:]}")
    kernels, current = {}, None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            kernels[current] = {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    names = demangle(list(kernels))
    return {f"{short_name(names[k])}@sm_{arch}": v for k, v in kernels.items()}


def collect():
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    report = {}
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)):
        for arch in ARCHS:
            for name, usage in compile_report(nvcc, source, arch).items():
                usage["source"] = os.path.relpath(source, ROOT)
                report[name] = usage
    return report


def check(report, budget):
    problems = []
    for name, u in sorted(report.items()):
        if u["spill_stores"] or u["spill_loads"]:
            problems.append(f"{name} spills ({u['spill_stores']} B stores, {u['spill_loads']} B loads)")
        limit = budget.get(name)
        if limit is None:
            problems.append(f"{name} has no budget: review it and run `python csrc/tests/ptxas_report.py --update`")
        elif u["registers"] > limit["registers"]:
            problems.append(f"{name} uses {u['registers']} registers, budget {limit['registers']}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", action="store_true", help="rewrite the budget from this compile")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()
    report = collect()
    if report is None:
        print("nvcc not found: no ptxas report")
        return 0
    print(f"{'kernel@arch':<70} {'regs':>5} {'smem B':>7} {'stack B':>7} {'spill st/ld':>12}")
    for name, u in sorted(report.items()):
        print(f"{name:<70} {u['registers']:>5} {u['smem']:>7} {u['stack']:>7} {u['spill_stores']:>5}/{u['spill_loads']:<6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    if args.update:
        with open(BUDGET, "w") as f:
            json.dump({k: {"registers": v["registers"]} for k, v in sorted(report.items())}, f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.relpath(BUDGET, ROOT)}")
        return 0
    budget = json.load(open(BUDGET)) if os.path.exists(BUDGET) else {}
    problems = check(report, budget)
    for p in problems:
        print("FAIL:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
