"""Griffe extension for the docs build: Keras-style docstrings, rendered.

Keras docstrings write `>>>` examples flush with the text after `Example:`
(no indented section, no code fence). Markdown would read them as prose
(`[0]["rho"]` becomes a broken link), so this wraps each run of `>>>` /
`...` lines, and the output lines that follow them, in a python code fence.
It also joins an `Args:` entry that names several parameters over two lines
(`loss, metrics,` / `jit_compile: as for ...`) so that the parser sees one
`names: description` line. Docstrings in the package are left as they are.
"""

import re

import griffe

_PROMPT = re.compile(r"^(\s*)(>>>|\.\.\.)( |$)")
_CONTINUED = re.compile(r"^(\s+)([\w*]+(, *[\w*]+)*,)\s*$")


def fence_doctests(text):
    lines = text.split("\n")
    out = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else _PROMPT.match(line)
        if match is None:
            out.append(line)
            i += 1
            continue
        indent = match.group(1)
        out.append(f"{indent}```python")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def join_multi_name_args(text):
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        match = _CONTINUED.match(lines[i])
        if match and i + 1 < len(lines) and ":" in lines[i + 1]:
            out.append(lines[i].rstrip() + " " + lines[i + 1].strip())
            i += 2
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


class KerasDocstrings(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            value = join_multi_name_args(obj.docstring.value)
            obj.docstring.value = fence_doctests(value)
