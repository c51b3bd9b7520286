#!/usr/bin/env python3
"""Checks the layering of a crate's modules (docs/architecture.md).

Builds the import graph of `src/` at top-level-module granularity from
`crate::<module>` paths outside comments and test modules, prints it, and
fails when two modules import each other through any chain (a cycle) or when
a module imports `cli` (the command line sits on top; nothing imports it).

    scripts/check-layers.py core/host/src core/runtime/src
"""
import os, re, sys


def check(root):
    mods = {}
    for entry in sorted(os.listdir(root)):
        p = os.path.join(root, entry)
        name = entry[:-3] if entry.endswith('.rs') else entry
        if name in ('lib', 'main'):
            continue
        files = [p] if os.path.isfile(p) else [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith('.rs')]
        mods[name] = files
    graph = {}
    for m, files in mods.items():
        deps = set()
        for f in files:
            text = open(f).read()
            # Comments (doc links) are not imports.
            text = re.sub(r'//.*', '', text)
            # Drop #[cfg(test)] modules: tests may reach across layers.
            text = re.split(r'#\[cfg\(test\)\]\s*mod ', text)[0]
            for d in re.findall(r'crate::([a-z_]+)', text):
                if d != m and d in mods:
                    deps.add(d)
            for d in re.findall(r'use crate::\{([^}]*)\}', text):
                for x in re.findall(r'\b([a-z_]+)\b', d):
                    if x != m and x in mods:
                        deps.add(x)
        graph[m] = sorted(deps)
    for m in graph:
        print(f"{m:12} -> {', '.join(graph[m]) or '-'}")
    bad = [m for m in graph if 'cli' in graph[m]]
    if bad:
        print(f"{root}: imports cli: {', '.join(bad)}")
        return False
    state = {}  # 1: on the current path, 2: done

    def cycle_from(m, path):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                return path + [m, d]
            if not state.get(d):
                found = cycle_from(d, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in graph:
        if not state.get(m):
            found = cycle_from(m, [])
            if found:
                print(f"{root}: import cycle: {' -> '.join(found)}")
                return False
    print(f"{root}: no cycles; nothing imports cli")
    return True


roots = sys.argv[1:] or ['core/host/src', 'core/runtime/src']
ok = all([check(r) for r in roots])
sys.exit(0 if ok else 1)
