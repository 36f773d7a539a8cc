"""The include rules of the native library (csrc/), checked on every source file (DESIGN.md, "The layers"):

- a capability folder (gguf/, attention/, kvcache/, gemm/, ...) includes its own files, core/, public headers
  (flashlm/...), and from another capability only the headers that capability names as shared (shared_*);
- core/ includes only core/ and public headers; public headers include only public headers;
- bindings/ includes only its own files and public headers, and is the only folder that includes nanobind.
"""

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu", ".cuh"))
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)


def folder(path: Path) -> str:
    """The top folder under csrc/ that holds path ("include" for public headers)."""
    return path.relative_to(CSRC).parts[0]


def includes(path: Path):
    """(line, delimiter, name) of every #include in path."""
    text = path.read_text()
    for m in INCLUDE.finditer(text):
        yield text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)


def violation(path: Path, delim: str, name: str):
    """Why path may not include name, or None."""
    own = folder(path)
    if delim == "<":
        if name.startswith("nanobind") and own != "bindings":
            return "only csrc/bindings includes nanobind"
        return None
    if name.startswith("flashlm/"):
        return None  # a public header: anyone may include it
    if own == "include":
        return "a public header includes only public headers (flashlm/...)"
    target = (path.parent / name).resolve()
    if not target.is_relative_to(CSRC) or not target.exists():
        return f"does not resolve to a file under csrc/ ({target})"
    other = folder(target)
    if other == own:
        return None
    if own == "bindings":
        return "bindings include only their own files and public headers"
    if other == "core":
        return None
    if own == "core":
        return "core/ includes only core/ and public headers"
    if other in ("include", "bindings"):
        return f"includes {other}/ by a relative path"
    if not target.name.startswith("shared_"):
        return f"reaches into {other}/'s private header {target.name} (only its shared_* headers are for other folders)"
    return None


def test_sources_are_found():
    assert len(SOURCES) > 50 and any(folder(p) == "core" for p in SOURCES)


def test_includes_follow_the_layers():
    bad = [f"{path.relative_to(CSRC)}:{line}: #include {d}{name}{'>' if d == '<' else d}: {why}"
           for path in SOURCES for line, d, name in includes(path) if (why := violation(path, d, name))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source, name, allowed", [
    ("kvcache/paged_cpu.h", "../attention/attention_cpu.h", False),
    ("kvcache/paged_cpu.h", "../attention/shared_cpu.h", True),
    ("norm/rms_norm_scalar.cpp", "../gguf/dequantize_kernels.h", False),
    ("core/thread_pool.cpp", "../gguf/shared_decoders.h", False),
    ("bindings/bind_core.cpp", "../core/half.h", False),
    ("gemm/gguf_matmul.cpp", "../core/half.h", True),
])
def test_rules_reject_what_they_should(source, name, allowed):
    """The checker itself: a private header of another folder is refused, a shared_* one or core/ accepted."""
    assert (violation(CSRC / source, '"', name) is None) == allowed
