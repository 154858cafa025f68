#!/usr/bin/env python3
"""Run the e2e suites of one lane with their time budgets, and print a timing table.

    e2e/suites.py --lane ci|long [SUITE ...]

A suite is one test binary of the trellis-e2e package (e2e/tests/<name>.rs), run with one test
thread, optionally with extra environment. e2e/suites.txt lists every suite: its budget in
seconds, its lane (`ci`: make test; `long`: make e2e-long) and its group. The groups run one
after another in file order; the suites of one group run at the same time (they share no
cluster-wide object). A suite fails when its tests fail or when it runs past its budget; the
run stops after the first group with a failure. Every test binary must be listed, so a new
suite cannot be left out by accident, and a run that selects nothing fails.

Each suite's output goes to <target dir>/e2e-logs/<suite>.log and is printed when the suite ends.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LANES = ("ci", "long")


def die(msg):
    print(f"suites.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_suites(path):
    suites = []
    for number, line in enumerate(open(path), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 4:
            die(f"{path}:{number}: want: SUITE BUDGET LANE GROUP [binary=NAME] [KEY=VALUE ...]")
        name, budget, lane, group, *rest = words
        if not budget.isdigit() or int(budget) <= 0:
            die(f"{path}:{number}: budget {budget!r} is not a number of seconds")
        if lane not in LANES:
            die(f"{path}:{number}: lane {lane!r} is not one of {LANES}")
        suite = {"name": name, "budget": int(budget), "lane": lane, "group": group,
                 "binary": name, "env": {}}
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep:
                die(f"{path}:{number}: {item!r} is not KEY=VALUE")
            if key == "binary":
                suite["binary"] = value
            else:
                suite["env"][key] = value
        if any(s["name"] == name for s in suites):
            die(f"{path}:{number}: suite {name} listed twice")
        suites.append(suite)
    return suites


def test_binaries():
    """Build the e2e test binaries (dev profile) and map each test target to its executable."""
    cmd = ["cargo", "test", "-p", "trellis-e2e", "--no-run", "--message-format=json-render-diagnostics"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        die("building the e2e tests failed")
    binaries = {}
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and "test" in msg["target"]["kind"] \
                and msg.get("executable"):
            binaries[msg["target"]["name"]] = msg["executable"]
    return binaries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lane", choices=LANES, required=True)
    ap.add_argument("--list", default=os.path.join(HERE, "suites.txt"))
    ap.add_argument("only", nargs="*", metavar="SUITE", help="run only these suites of the lane")
    a = ap.parse_args()

    suites = read_suites(a.list)
    binaries = test_binaries()
    listed = {s["binary"] for s in suites}
    unlisted = sorted(set(binaries) - listed)
    if unlisted:
        die(f"test binaries not in {a.list}: {', '.join(unlisted)} (give each a budget, lane and group)")
    missing = sorted(listed - set(binaries))
    if missing:
        die(f"{a.list} names suites with no test binary: {', '.join(missing)}")
    unknown = sorted(set(a.only) - {s["name"] for s in suites if s["lane"] == a.lane})
    if unknown:
        die(f"not suites of lane {a.lane}: {', '.join(unknown)}")
    selected = [s for s in suites if s["lane"] == a.lane and (not a.only or s["name"] in a.only)]
    if not selected:
        die(f"no suite selected in lane {a.lane}")

    logs = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(HERE, "..", "target"), "e2e-logs")
    os.makedirs(logs, exist_ok=True)
    groups = []
    for s in selected:
        if not groups or groups[-1][0] != s["group"]:
            groups.append((s["group"], []))
        groups[-1][1].append(s)

    results = []
    started = time.monotonic()
    failed = False
    for group, members in groups:
        running = []
        for s in members:
            log = open(os.path.join(logs, s["name"] + ".log"), "w")
            env = dict(os.environ, **s["env"])
            print(f"== e2e {s['name']} (group {group}, budget {s['budget']} s)", flush=True)
            proc = subprocess.Popen([binaries[s["binary"]], "--test-threads=1"], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(HERE))
            running.append((s, proc, log, time.monotonic()))
        for s, proc, log, t0 in running:
            try:
                rc = proc.wait(timeout=max(1, s["budget"] - (time.monotonic() - t0)))
                over = False
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                over = True
            seconds = time.monotonic() - t0
            log.close()
            with open(log.name) as f:
                output = f.read()
            sys.stdout.write(output)
            ran_nothing = "\nrunning 0 tests" in "\n" + output
            status = "over budget" if over else ("FAILED" if rc != 0 else
                                                 "ran no test" if ran_nothing else "ok")
            if status != "ok":
                failed = True
                print(f"== e2e {s['name']}: {status} after {seconds:.0f} s (log: {log.name})", flush=True)
            results.append((s, status, seconds))
        if failed:
            break

    print(f"\ne2e lane {a.lane}: per-suite timings (wall clock {time.monotonic() - started:.0f} s)")
    width = max(len(s["group"]) for s in selected) + 1
    print(f"  {'suite':<16} {'group':<{width}} {'seconds':>7} {'budget':>6}  result")
    for s, status, seconds in results:
        print(f"  {s['name']:<16} {s['group']:<{width}} {seconds:7.0f} {s['budget']:6d}  {status}")
    not_run = [s["name"] for s in selected if s not in [r[0] for r in results]]
    if not_run:
        print(f"  not run after the failure: {', '.join(not_run)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
