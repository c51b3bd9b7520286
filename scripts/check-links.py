#!/usr/bin/env python3
"""Checks that every relative link in the project's Markdown resolves.

For each Markdown file given (default: README.md, every file under docs/,
backbones/ and plugins/*/README.md, bindings/python/README.md), every link
or image `[text](target)` whose target is not a URL must name a file or
directory that exists, relative to the file; a `#anchor` must be a heading
of the target file (GitHub's slugs: lower case, punctuation dropped, spaces
as hyphens). Links inside code blocks and code spans are ignored. Exits 1
and lists each broken link with its file and line.

    python3 scripts/check-links.py [FILE.md ...]
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def default_files():
    files = [ROOT / "README.md"]
    for folder in ["docs", "backbones"]:
        files += sorted((ROOT / folder).rglob("*.md"))
    files += sorted(ROOT.glob("plugins/*/README.md"))
    files += [p for p in [ROOT / "bindings/python/README.md"] if p.is_file()]
    return files


def slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"`", "", s)
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        seen = {}
        out = set()
        in_code = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            m = None if in_code else re.match(r"#{1,6}\s+(.*)", line)
            if m:
                base = slug(m.group(1))
                n = seen.get(base, 0)
                seen[base] = n + 1
                out.add(base if n == 0 else f"{base}-{n}")
        cache[path] = out
    return cache[path]


def links(path):
    in_code = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for m in LINK.finditer(line):
            yield number, m.group(1)


def broken(path):
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / file_part).resolve()
        if not dest.exists():
            yield number, target, "no such file"
            continue
        if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            yield number, target, f"no heading #{anchor} in {dest.relative_to(ROOT)}"


def main(argv):
    files = [Path(a).resolve() for a in argv] or default_files()
    bad = 0
    count = 0
    for f in files:
        for number, target, why in broken(f):
            print(f"{f.relative_to(ROOT)}:{number}: ({target}) {why}")
            bad += 1
        count += sum(1 for _ in links(f))
    print(f"{len(files)} files, {count} links, {bad} broken")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
