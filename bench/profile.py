"""Where the time goes: summarise py-spy's collapsed stacks (`py-spy record --format raw`).

    python -m bench.profile FILE [--top N]

Each line of FILE is `frame;frame;...;leaf COUNT`, a frame being `function (path:line)`. Self time
is counted for the leaf frame, total (inclusive) time once per function per stack.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_NOT_A_FRAME = re.compile(r"^(process \d+:|thread \(0x)")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`process (stream_processors/telemetry.py)`: the function and a short path, without the line."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("path")
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    return f"{m.group('func')} ({path})"


def area(name: str) -> str:
    """A coarse owner of a frame: our packages, a library, the standard library, native code."""
    path = name[name.rfind("(") + 1:-1] if name.endswith(")") else ""
    if path.startswith("stdlib:"):
        mod = path[len("stdlib:"):].split("/")[0].removesuffix(".py")
        return f"stdlib {mod}"
    top = path.split("/")[0].removesuffix(".py") if path else "native"
    return top or "native"


def summarise(text: str) -> dict[str, Counter[str]]:
    self_t: Counter[str] = Counter()
    total_t: Counter[str] = Counter()
    area_t: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        try:
            count = int(n)
        except ValueError:
            continue
        # py-spy may put `process PID:"cmd"` and `thread (0x...)` first: not functions
        frames = [frame_name(f) for f in stack.split(";") if f and not _NOT_A_FRAME.match(f)]
        if not frames:
            continue
        samples += count
        self_t[frames[-1]] += count
        area_t[area(frames[-1])] += count
        for f in set(frames):
            total_t[f] += count
    return {"self": self_t, "total": total_t, "area": area_t, "samples": Counter({"samples": samples})}


def render(summary: dict[str, Counter[str]], top: int = 25) -> str:
    samples = summary["samples"]["samples"] or 1
    out = [f"samples: {summary['samples']['samples']}", "", "self time by area (leaf frame's package):"]
    for name, n in summary["area"].most_common(15):
        out.append(f"  {100 * n / samples:5.1f}%  {name}")
    out += ["", f"top {top} functions by self time:"]
    for name, n in summary["self"].most_common(top):
        out.append(f"  {100 * n / samples:5.1f}%  {name}")
    out += ["", f"top {top} functions by total (inclusive) time:"]
    for name, n in summary["total"].most_common(top):
        out.append(f"  {100 * n / samples:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    top = 25
    if "--top" in argv:
        i = argv.index("--top")
        top = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    print(render(summarise(Path(argv[0]).read_text()), top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
