"""tracemalloc snapshots of the instrumented gateway, compared: where the bytes per socket go."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.lib.results import rel


def _source_line(filename: str, lineno: int) -> str:
    import linecache

    return linecache.getline(filename, lineno).strip()[:70]


def tracemalloc_report(before: str, after: str, n: int, out_txt: Path) -> dict[str, Any]:
    """Compare two snapshots: bytes and blocks per socket, by line, file and traceback."""
    import tracemalloc

    s0 = tracemalloc.Snapshot.load(before)
    s1 = tracemalloc.Snapshot.load(after)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    s0, s1 = s0.filter_traces(ignore), s1.filter_traces(ignore)
    total0 = sum(st.size for st in s0.statistics("filename"))
    total1 = sum(st.size for st in s1.statistics("filename"))
    blocks0 = sum(st.count for st in s0.statistics("filename"))
    blocks1 = sum(st.count for st in s1.statistics("filename"))

    def short(path: str) -> str:
        for marker in ("site-packages/", "/lib/python3.11/", "/gateway/"):
            idx = path.find(marker)
            if idx >= 0:
                rest = path[idx + len(marker) :]
                return ("gateway/" + rest) if marker == "/gateway/" else rest
        return path

    by_line = s1.compare_to(s0, "lineno")
    by_file = s1.compare_to(s0, "filename")
    by_tb = s1.compare_to(s0, "traceback")
    lines = [
        f"tracemalloc: {n} idle sockets; Python heap {total0 / 1e6:.1f} MB -> {total1 / 1e6:.1f} MB "
        f"(+{(total1 - total0) / n:.0f} B and +{(blocks1 - blocks0) / n:.1f} blocks per socket)",
        "",
        "by line (bytes per socket, blocks per socket):",
    ]
    top_lines = []
    for st in by_line[:30]:
        fr = st.traceback[0]
        where = f"{short(fr.filename)}:{fr.lineno}"
        top_lines.append(
            {
                "where": where,
                "bytes_per_socket": round(st.size_diff / n, 1),
                "blocks_per_socket": round(st.count_diff / n, 2),
            }
        )
        lines.append(f"  {st.size_diff / n:8.0f} B  {st.count_diff / n:6.2f}  {where}")
    lines += ["", "by file:"]
    top_files = []
    for st in by_file[:20]:
        where = short(st.traceback[0].filename)
        top_files.append({"file": where, "bytes_per_socket": round(st.size_diff / n, 1)})
        lines.append(f"  {st.size_diff / n:8.0f} B  {st.count_diff / n:6.2f}  {where}")
    packages: dict[str, float] = defaultdict(float)
    for st in by_file:
        where = short(st.traceback[0].filename)
        if where.startswith("<attrs generated methods trio"):
            pkg = "trio"
        elif "/" in where:
            pkg = where.split("/", 1)[0]
        else:
            pkg = "stdlib" if where.endswith(".py") or where.startswith("<frozen") else "other"
        packages[pkg] += st.size_diff / n
    by_package = {k: round(v, 1) for k, v in sorted(packages.items(), key=lambda kv: -kv[1])}
    lines += ["", "by package (bytes per socket):"]
    for pkg, v in by_package.items():
        if abs(v) >= 1:
            lines.append(f"  {v:8.0f} B  {pkg}")
    # Who is responsible: each allocation charged to the innermost gateway line on its stack
    # (e.g. wsproto's handshake state to the gateway line that created the WSConnection).
    sites: dict[str, float] = defaultdict(float)
    for st in by_tb:
        site = "(no gateway frame in the recorded stack)"
        for fr in reversed(list(st.traceback)):
            where = short(fr.filename)
            if where.startswith("gateway/"):
                site = f"{where}:{fr.lineno} {_source_line(fr.filename, fr.lineno)}"
                break
        sites[site] += st.size_diff / n
    by_site = sorted(sites.items(), key=lambda kv: -kv[1])
    lines += ["", "by the innermost gateway line on the allocation's stack (bytes per socket):"]
    for site, v in by_site[:25]:
        lines.append(f"  {v:8.0f} B  {site}")
    lines += ["", "by traceback (largest 12; innermost frame last):"]
    for st in by_tb[:12]:
        lines.append(f"  {st.size_diff / n:8.0f} B  {st.count_diff / n:6.2f} blocks")
        for fr in list(st.traceback)[-8:]:
            lines.append(f"        {short(fr.filename)}:{fr.lineno}")
    out_txt.write_text("\n".join(lines) + "\n")
    return {
        "python_heap_before_mb": round(total0 / 1e6, 2),
        "python_heap_after_mb": round(total1 / 1e6, 2),
        "python_heap_bytes_per_socket": round((total1 - total0) / n, 1),
        "python_blocks_per_socket": round((blocks1 - blocks0) / n, 2),
        "by_package_bytes_per_socket": {k: v for k, v in by_package.items() if abs(v) >= 1},
        "by_gateway_line_bytes_per_socket": [
            {"site": site, "bytes": round(v, 1)} for site, v in by_site[:12]
        ],
        "top_lines": top_lines[:15],
        "top_files": top_files[:10],
        "table": rel(out_txt),
    }
