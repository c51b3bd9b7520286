#!/usr/bin/env python3
"""Checks the layering of a crate's modules (docs/architecture.md).

Builds the import graph of `src/` at top-level-module granularity from
`crate::<module>` paths outside comments and test modules, prints it, and
fails when two modules import each other through any chain (a cycle) or when
a module imports `cli` (the command line sits on top; nothing imports it).
Inside each folder it then checks the files the same way: no two files of
one folder (its `mod.rs` aside) may import each other through any chain.

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
    return check_files(root)


def strip(text):
    """A file's text without comments and `#[cfg(test)]` modules."""
    text = re.sub(r'//.*', '', text)
    return re.split(r'#\[cfg\(test\)\]\s*mod ', text)[0]


def file_graph(folder, modpath):
    """The import graph between the files of one folder (`mod.rs`, the
    folder's root and its re-exports, left out): file `a` imports sibling
    `b` through `crate::<modpath>::b`, `super::b` or a `use` group of
    either naming `b`."""
    files = {f[:-3]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
             if f.endswith('.rs') and f != 'mod.rs'}
    subdirs = [d for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
    for d in subdirs:
        # A sub-folder is one node too (all its files).
        files.setdefault(d, os.path.join(folder, d))
    graph = {}
    prefix = 'crate::' + '::'.join(modpath) + '::' if modpath else 'crate::'
    for name, path in files.items():
        paths = [path] if os.path.isfile(path) else [
            os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith('.rs')]
        text = ''.join(strip(open(p).read()) for p in paths)
        groups = re.findall(re.escape(prefix) + r'\{([^}]*)\}', text)
        groups += re.findall(r'super::\{([^}]*)\}', text)
        deps = set()
        for other in files:
            if other == name:
                continue
            pat = r'(?:' + re.escape(prefix) + r'|\bsuper::)' + other + r'\b'
            if re.search(pat, text) or any(re.search(r'(?<![:\w])' + other + r'\b', g) for g in groups):
                deps.add(other)
        graph[name] = sorted(deps)
    return graph


def find_cycle(graph):
    state = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, []):
            if state.get(d) == 1:
                return path + [m, d]
            if not state.get(d):
                found = visit(d, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in graph:
        if not state.get(m):
            found = visit(m, [])
            if found:
                return found
    return None


def check_files(root):
    """No two files of one folder import each other through any chain."""
    ok = True
    for folder, dirs, _ in os.walk(root):
        dirs.sort()
        if folder == root:
            continue
        modpath = os.path.relpath(folder, root).split(os.sep)
        graph = file_graph(folder, modpath)
        found = find_cycle(graph)
        if found:
            print(f"{folder}: file import cycle: {' -> '.join(found)}")
            ok = False
    if ok:
        print(f"{root}: no cycles between the files of any folder")
    return ok


roots = sys.argv[1:] or ['core/host/src', 'core/runtime/src']
ok = all([check(r) for r in roots])
sys.exit(0 if ok else 1)
