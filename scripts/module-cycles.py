#!/usr/bin/env python3
"""Fails when modules of a crate import each other in a cycle.

A module is a source file (`foo.rs` or `foo/mod.rs`). An edge A -> B exists when A names an
item of B through a `crate::` or `super::` path (in a `use` or inline). Edges between a module
and one of its ancestors are not counted: a parent declares its children and children may use
what the parent re-exports, which is containment, not a cycle. Test modules (`tests.rs`, and the
`#[cfg(test)] mod tests { .. }` block at the end of a file) are skipped: tests may reach anywhere.

usage: module-cycles.py CRATE_SRC_DIR...   (exit 1 and the cycles listed when there is one)
"""
import os
import re
import sys

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{")


def modules(src):
    """Module path (tuple) -> file, for every source file under src."""
    found = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            if rel and rel[-1] == "tests":
                continue
            found.setdefault(tuple(rel), os.path.join(root, f))
    return found


def strip_tests(text):
    """Drops comments and a trailing `#[cfg(test)] mod tests { ... }` block."""
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests\s*\{", text)
    return text[: m.start()] if m else text


def group_paths(text, start):
    """The `a::b` paths inside the brace group opening at text[start] (nested groups expanded)."""
    depth, i, out, cur, prefix = 0, start, [], "", [""]
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            prefix.append(prefix[-1] + cur.strip())
            cur = ""
        elif c == "}":
            if cur.strip():
                out.append(prefix[-1] + cur.strip())
            cur = ""
            prefix.pop()
            depth -= 1
            if depth == 0:
                break
        elif c == ",":
            if cur.strip():
                out.append(prefix[-1] + cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    return [p for p in out if not p.endswith("::")]


def resolve(mods, base, kind, segs):
    """The longest known module named by `kind::segs` written in module `base`."""
    path = list(base) if kind == "super" else []
    if kind == "super":
        path = path[:-1]
        while segs and segs[0] == "super":
            path, segs = path[:-1], segs[1:]
    best = tuple(path) if tuple(path) in mods else None
    for s in segs:
        path.append(s)
        if tuple(path) in mods:
            best = tuple(path)
    return best


def edges(mods):
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        with open(f, encoding="utf-8") as fh:
            text = strip_tests(fh.read())
        paths = [(k, s) for k, s in PATH.findall(text)]
        for g in GROUP.finditer(text):
            kind, head = g.group(1), g.group(2)
            for p in group_paths(text, g.end() - 1):
                paths.append((kind, head + "::" + p.replace(" ", "")))
        aliases = {}
        targets = []
        for kind, rest in paths:
            raw = [s for s in rest.split("::") if s]
            alias = raw[-1].split(" as ")[-1].strip() if raw else None
            if raw and raw[-1] == "self":
                alias = raw[-2] if len(raw) > 1 else None
            segs = [s.split(" as ")[0].strip() for s in raw if s != "self"]
            t = resolve(mods, m, kind, segs)
            if t is not None and alias and len(t) and t[-1] == segs[-1]:
                aliases[alias] = t
            targets.append(t)
        # A module imported by name (`use crate::l7;`) and then used as `l7::outbound::serve`.
        for alias, mod in aliases.items():
            for rest in re.findall(r"(?<![:\w])" + re.escape(alias) + r"((?:::[A-Za-z_]\w*)+)", text):
                path = list(mod)
                best = mod
                for s in rest.split("::")[1:]:
                    path.append(s)
                    if tuple(path) in mods:
                        best = tuple(path)
                targets.append(best)
        for t in targets:
            if t is None or t == m or t == m[: len(t)] or m == t[: len(m)]:
                continue
            graph[m].add(t)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(m):
    return "::".join(m) or "crate"


def main():
    failed = False
    for src in sys.argv[1:]:
        graph = edges(modules(src))
        for comp in cycles(graph):
            failed = True
            members = set(comp)
            print(f"{src}: import cycle between {', '.join(name(m) for m in comp)}")
            for m in comp:
                for t in sorted(graph[m] & members):
                    print(f"    {name(m)} -> {name(t)}")
    if failed:
        sys.stdout.flush()
        print("module-cycles: break each cycle by moving what both sides need into a module "
              "neither imports from", file=sys.stderr)
        return 1
    print(f"module-cycles: no import cycle in {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
