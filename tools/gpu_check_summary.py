#!/usr/bin/env python3
"""Writes OUTDIR/summary.md and OUTDIR/junit.xml for tools/gpu_check.sh and decides PASS/FAIL.

Usage: gpu_check_summary.py WORKDIR OUTDIR BUILDDIR   (called by gpu_check.sh; standard library only)
Reads WORKDIR/{facts,phases,train,sanitizer}.tsv, WORKDIR/plan.txt, WORKDIR/junit-{cuda-t0,cuda-t1,cpu}.xml (ctest
--output-junit; falls back to parsing OUTDIR/ctest.log when ctest was cut off before writing one) and BUILDDIR/tests/*_tests.cmake (test name
-> executable). Writes WORKDIR/verdict (PASS or FAIL).
"""
import glob
import math
import os
import re
import sys
import xml.etree.ElementTree as ET

# Training comparison tolerances (cuda vs cpu, float32 on both; the GPU may sum in another order or use TF32).
FWD_RTOL = 1e-3          # step-1 logps/chosen: the forward pass before any update
LOSS_ATOL, LOSS_RTOL = 0.02, 0.05   # final loss after 20 AdamW steps


def read_tsv(path, ncols):
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            rows.append(parts + [""] * (ncols - len(parts)))
    return rows


def md(s):
    return str(s).replace("|", "\\|").replace("\n", " ").strip()


def test_binaries(build):
    """ctest test name -> test executable, from gtest_discover_tests' generated files."""
    names = {}
    for f in glob.glob(os.path.join(build, "tests", "*_tests.cmake")):
        binary = os.path.basename(f).split("[")[0]
        try:
            text = open(f, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        for m in re.finditer(r"add_test\(\s*\[=\[(.*?)\]=\]", text):
            names[m.group(1)] = binary
    return names


def first_reason(out, kind):
    """The skip reason (the line after 'Skipped') or the first failure lines from a gtest output."""
    lines = (out or "").splitlines()
    if kind == "skipped":
        for i, l in enumerate(lines):
            if l.rstrip().endswith(": Skipped") and i + 1 < len(lines):
                return lines[i + 1].strip()
        return ""
    for i, l in enumerate(lines):
        if re.search(r": Failure$|error:|what\(\)|Exception|terminate", l):
            return " ".join(x.strip() for x in lines[i:i + 3])[:220]
    return ""


def parse_junit(path):
    """[(name, result, seconds, note)], root element or None."""
    tree = ET.parse(path)
    root = tree.getroot()
    rows = []
    for tc in root.iter("testcase"):
        name = tc.get("name", "?")
        status = tc.get("status", "")
        out = (tc.findtext("system-out") or "")
        if tc.find("failure") is not None or status == "fail":
            res = "FAIL"
            msg = tc.find("failure").get("message", "") if tc.find("failure") is not None else ""
            note = first_reason(out, "fail") or msg
            if "Timeout" in out[-300:] or msg == "Timeout":
                res, note = "TIMEOUT", note or "timed out"
        elif tc.find("skipped") is not None or status in ("notrun", "disabled"):
            res = "skip"
            note = first_reason(out, "skipped") or (tc.find("skipped").get("message", "")
                                                    if tc.find("skipped") is not None else status)
        else:
            res = "pass"
            note = ""
        try:
            secs = float(tc.get("time", "0"))
        except ValueError:
            secs = 0.0
        rows.append((name, res, secs, note))
    return rows, root


def parse_ctest_log(path, label):
    """Fallback: the 'Test #N: NAME ....   Passed' lines of one ctest -L LABEL section of ctest.log."""
    rows = []
    if not os.path.exists(path):
        return rows
    text = open(path, encoding="utf-8", errors="replace").read()
    m = re.search(r"== ctest -L %s .*?(?=\n== ctest -L (?!%s )|\Z)" % (label, label), text, re.S)
    if not m:
        return rows
    for t in re.finditer(r"Test\s+#\d+: (\S+) \.+\s*(\*{3})?(Passed|Failed|Skipped|Not Run|Timeout|Exception\S*)"
                         r"\s+([\d.]+) sec", m.group(0)):
        res = {"Passed": "pass", "Skipped": "skip", "Not Run": "skip", "Timeout": "TIMEOUT"}.get(t.group(3), "FAIL")
        rows.append((t.group(1), res, float(t.group(4)), "(from ctest.log)"))
    return rows


def load_tests(work, out, label):
    path = os.path.join(work, "junit-%s.xml" % label)
    if os.path.exists(path):
        try:
            rows, root = parse_junit(path)
            return rows, root, "junit"
        except ET.ParseError:
            pass
    rows = parse_ctest_log(os.path.join(out, "ctest.log"), label)
    return rows, None, ("ctest.log" if rows else "none")


def merged_junit(roots, dest):
    """One <testsuites> with a suite per label; output kept only for tests that did not pass (smaller file)."""
    top = ET.Element("testsuites", name="gpu_check")
    for label, root in roots:
        if root is None:
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for s in suites:
            s.set("name", "ctest -L " + label)
            for tc in s.iter("testcase"):
                if tc.find("failure") is None and tc.find("skipped") is None:
                    for so in tc.findall("system-out"):
                        tc.remove(so)
            top.append(s)
    ET.ElementTree(top).write(dest, encoding="utf-8", xml_declaration=True)


def fnum(s):
    try:
        v = float(s)
        return v if math.isfinite(v) else float("nan")
    except (TypeError, ValueError):
        return None


# Phase statuses that are not failures: "not run" is a phase this machine cannot run by design (one GPU for the
# multi-GPU tier, no torch for the PyTorch parity, no profiler); it is listed, never counted as passed.
NOT_RUN = ("not run", "unavailable")


def main():
    work, out, build = sys.argv[1:4]
    facts = {k: v for k, v, *_ in read_tsv(os.path.join(work, "facts.tsv"), 2)}
    phases = read_tsv(os.path.join(work, "phases.tsv"), 4)
    train = read_tsv(os.path.join(work, "train.tsv"), 8)
    san = read_tsv(os.path.join(work, "sanitizer.tsv"), 8)
    plan = open(os.path.join(work, "plan.txt"), encoding="utf-8").read() if os.path.exists(
        os.path.join(work, "plan.txt")) else ""
    phase = {p[0]: p for p in phases}
    bins = test_binaries(build)
    problems = []
    not_run = []

    have_gpu = facts.get("have_gpu") == "1"
    if not have_gpu:
        problems.append("no CUDA device on this machine (%s)" % facts.get("card", "?"))
    for name in ("configure", "build"):
        p = phase.get(name)
        if not p or p[1] != "ok":
            problems.append("%s: %s %s" % (name, p[1] if p else "not run", p[3] if p else ""))
    if facts.get("cuda_enabled") != "1" and phase.get("configure", ["", ""])[1] == "ok":
        problems.append("CUDA not enabled in the build (nvcc not found?)")

    # CUDA tests, per tier
    tiers = []
    for tier in ("t0", "t1"):
        ph = "cuda-" + tier
        if ph not in phase:
            continue
        rows, root, src = load_tests(work, out, ph)
        cnt = {r: sum(1 for x in rows if x[1] == r) for r in ("pass", "FAIL", "TIMEOUT", "skip")}
        tiers.append((ph, rows, root, src, cnt))
        if phase[ph][1] in ("ok", "FAIL", "timeout"):
            if not rows:
                problems.append("%s: no CUDA tests ran" % ph)
            if cnt["FAIL"] or cnt["TIMEOUT"]:
                problems.append("%s: %d CUDA tests failed, %d timed out" % (ph, cnt["FAIL"], cnt["TIMEOUT"]))
            if cnt["skip"]:
                problems.append("%s: %d CUDA tests skipped" % (ph, cnt["skip"]))
            if phase[ph][1] == "timeout":
                problems.append("ctest -L %s hit its time limit" % ph)
        else:
            problems.append("%s: %s (%s)" % (ph, phase[ph][1], phase[ph][3]))

    # Training
    tr = {r[0]: r for r in train}
    train_lines = []
    cmp_line = ""
    if tr:
        c, p = tr.get("cuda"), tr.get("cpu")
        if c is None or c[1] != "0":
            why = (c[7] if c else "") or "no result"
            kind = "unavailable" if (not have_gpu or "not available" in why or "no CUDA device" in why) else "failed"
            problems.append("training on cuda %s: %s" % (kind, why))
        if p is None or p[1] != "0":
            problems.append("training on cpu failed: %s" % ((p[7] if p else "") or "no result"))
        if c and p and c[1] == "0" and p[1] == "0":
            lc, lp = fnum(c[6]), fnum(p[6])
            fc, fp = fnum(c[4]), fnum(p[4])
            parts = []
            if fc is not None and fp is not None and fp != 0:
                rel = abs(fc - fp) / abs(fp)
                ok = rel <= FWD_RTOL
                parts.append("step-1 logps/chosen rel. diff %.2e (%s, limit %.0e)" % (rel, "ok" if ok else "TOO LARGE", FWD_RTOL))
                if not ok:
                    problems.append("cuda and cpu forward differ: logps/chosen %s vs %s" % (c[4], p[4]))
            if lc is not None and lp is not None:
                d = abs(lc - lp)
                lim = LOSS_ATOL + LOSS_RTOL * abs(lp)
                ok = math.isfinite(lc) and d <= lim
                parts.append("final loss |cuda - cpu| = %.2e (%s, limit %.3f)" % (d, "ok" if ok else "TOO LARGE", lim))
                if not ok:
                    problems.append("final training loss differs: cuda %s vs cpu %s" % (c[6], p[6]))
            else:
                problems.append("training produced no loss to compare")
            cmp_line = "; ".join(parts)
        # Runs compared with the 1-GPU cuda run: a 1-rank NCCL communicator (its all-reduce is a copy), and the
        # multi-GPU tier's data-parallel runs (equal up to the summation order of the reduction).
        for label, r in tr.items():
            if label in ("cuda", "cpu") or c is None or c[1] != "0":
                continue
            if r[1] != "0":
                problems.append("training %s failed: %s" % (label, r[7] or "exit " + r[1]))
                continue
            ln, lc = fnum(r[6]), fnum(c[6])
            if ln is None or lc is None or abs(ln - lc) > LOSS_ATOL + LOSS_RTOL * abs(lc):
                problems.append("training %s: final loss %s differs from the 1-GPU cuda run's %s" % (label, r[6], c[6]))
        for label, r in tr.items():
            status = "ok" if r[1] == "0" else ("timeout" if r[1] in ("124", "137") else "exit %s" % r[1])
            train_lines.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                label, status, r[3] or "—", r[4] or "—", r[5] or "—", r[6] or "—", r[2] or "—", md(r[7])))
    elif "train" in phase:
        problems.append("training: %s (%s)" % (phase["train"][1], phase["train"][3]))

    # Every other phase: ok, or a problem, or not run by design.
    handled = {"env", "configure", "build", "cuda-t0", "cuda-t1", "train"}
    for p in phases:
        if p[0] in handled:
            continue
        if p[1] == "ok":
            continue
        if p[1] in NOT_RUN:
            not_run.append("%s: %s" % (p[0], p[3]))
        else:
            problems.append("%s: %s (%s)" % (p[0], p[1], p[3]))
    san_errors = sum(int(r[3]) for r in san if r[3].isdigit())

    # CPU tests (optional)
    cpu_rows, cpu_root, cpu_src = ([], None, "none")
    if "cpu-tests" in phase:
        cpu_rows, cpu_root, cpu_src = load_tests(work, out, "cpu")
        bad = [r for r in cpu_rows if r[1] in ("FAIL", "TIMEOUT")]
        if bad:
            problems.append("CPU tests: %d failed/timed out" % len(bad))

    verdict = "PASS" if not problems else "FAIL"
    try:
        merged_junit([(t[0], t[2]) for t in tiers] + [("cpu", cpu_root)], os.path.join(out, "junit.xml"))
    except Exception as e:  # noqa: BLE001 - the summary matters more than the junit file
        problems.append("junit.xml not written: %s" % e)

    L = []
    L.append("# GPU check summary")
    L.append("")
    L.append("**Result: %s**%s (%s)" % (verdict, "" if not problems else " (%d problems)" % len(problems),
                                        facts.get("mode", "?")))
    for p in problems:
        L.append("- %s" % md(p))
    if not_run:
        L.append("")
        L.append("Not run on this machine (not counted as passed):")
        for p in not_run:
            L.append("- %s" % md(p))
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    for k in ("date", "card", "commit", "mode", "nvcc", "cmake", "cxx", "os", "host", "compute_sanitizer", "cudnn",
              "nccl", "deps", "budget", "total_seconds"):
        if k in facts:
            L.append("| %s | %s |" % (k.replace("_", " "), md(facts[k])))
    L.append("")
    L.append("## Phases")
    L.append("")
    L.append("| phase | status | wall s | note |")
    L.append("|---|---|---|---|")
    for p in phases:
        L.append("| %s | %s | %s | %s |" % (p[0], p[1], p[2], md(p[3])))
    if plan:
        L.append("")
        L.append("Plan (limits and estimates):")
        L.append("```")
        L.append(plan.rstrip())
        L.append("```")
    for ph, rows, root, src, cnt in tiers:
        L.append("")
        L.append("## CUDA tests (`ctest -L %s`): %d passed, %d failed, %d timed out, %d skipped, of %d"
                 % (ph, cnt["pass"], cnt["FAIL"], cnt["TIMEOUT"], cnt["skip"], len(rows)))
        L.append("")
        if rows:
            L.append("| executable | test | result | s | note |")
            L.append("|---|---|---|---|---|")
            for name, res, secs, note in sorted(rows, key=lambda r: (bins.get(r[0], "~"), r[0])):
                L.append("| %s | %s | %s | %.2f | %s |" % (bins.get(name, "?"), md(name), res, secs, md(note)))
        else:
            L.append("No CUDA test results (%s)." % md(phase.get(ph, ["", "not run", "", ""])[3] or src))
    L.append("")
    L.append("## compute-sanitizer: %s" % ("%d errors" % san_errors if san else "not run"))
    L.append("")
    if san:
        L.append("| tool | run | result | errors | s | gtest passed | failed | skipped |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in san:
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % tuple(md(x) or "—" for x in r[:8]))
    else:
        L.append("%s." % md("; ".join("%s: %s" % (n, phase[n][3]) for n in ("memcheck", "racecheck", "initcheck")
                                     if n in phase) or "Not run"))
    L.append("")
    L.append("## Training: 20 DPO steps (sigmoid, β 0.1, lr 2e-4), tiny GPT-2 (2 layers, width 64), 48 generated pairs")
    L.append("")
    if train_lines:
        L.append("| run | result | steps | logps/chosen step 1 | loss step 1 | final loss | wall s | note |")
        L.append("|---|---|---|---|---|---|---|---|")
        L.extend(train_lines)
        if cmp_line:
            L.append("")
            L.append("cuda vs cpu: " + cmp_line)
    else:
        L.append("Not run: %s." % md(phase.get("train", ["", "", "", "phase missing"])[3]))
    if "cpu-tests" in phase:
        ccnt = {r: sum(1 for x in cpu_rows if x[1] == r) for r in ("pass", "FAIL", "TIMEOUT", "skip")}
        L.append("")
        L.append("## CPU tests (`ctest -L cpu`): %d passed, %d failed, %d timed out, %d skipped, of %d"
                 % (ccnt["pass"], ccnt["FAIL"], ccnt["TIMEOUT"], ccnt["skip"], len(cpu_rows)))
        for name, res, secs, note in cpu_rows:
            if res in ("FAIL", "TIMEOUT"):
                L.append("- %s %s: %s" % (res, md(name), md(note)))
    L.append("")
    files = sorted(f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)))
    if "summary.md" not in files:
        files.append("summary.md")
    L.append("Files: " + ", ".join(sorted(files)))
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(L) + "\n")
    with open(os.path.join(work, "verdict"), "w") as f:
        f.write(verdict + "\n")


if __name__ == "__main__":
    main()
