"""Results documents for people: the text table, results.md (tables, stamp, definitions) and
results.png (decode tokens/s and drift per setting), and `--compare` of two results.json side by
side; the schema a results.json is checked against (schema.json, next to this file).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .metrics import _log

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale, spec)


def _mib(nbytes) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.2f}"


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["setting", "TTFT ms", "TPOT ms mean", "p50", "p90", "prefill tok/s", "decode tok/s",
              "peak MiB", "weights MiB", "GB/s", "% dev BW", "max|dlogit|", "top-1", "KL"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["id"], f"error: {r['error']}"] + [""] * (len(header) - 2))
            continue
        bw = r["bandwidth"]
        rows.append([
            r["id"], _fmt(r["ttft_s"]["median"], ".1f", 1e3), _fmt(r["tpot_s"]["mean"], ".2f", 1e3),
            _fmt(r["tpot_s"]["p50"], ".2f", 1e3), _fmt(r["tpot_s"]["p90"], ".2f", 1e3),
            _fmt(r["prefill_tokens_per_s"]["median"], ".1f"), _fmt(r["decode_tokens_per_s"]["mean"], ".2f"),
            _mib(r["peak_memory"]["bytes"]), _mib(r["weight_bytes"]),
            _fmt(bw["achieved_bytes_per_s"], ".2f", 1e-9), _fmt(bw["fraction_of_device"], ".0f", 100),
            _fmt(r["drift"]["max_abs_logit_diff"], ".2e"), _fmt(r["drift"]["top1_agreement"], ".3f"),
            _fmt(r["drift"]["mean_kl"], ".2e"),
        ])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp_lines(doc: dict) -> list[str]:
    hw, sw, cfg, model = doc["hardware"], doc["software"], doc["config"], doc["model"]
    cpu = hw["cpu"]
    gpus = "; ".join(f"{g['name']} (driver {g['driver']})" for g in hw["gpus"]) or "none"
    dirty = " (uncommitted changes)" if sw.get("dirty") else ""
    load = hw["load_average"]
    busy = ""
    others = competing_load(doc)
    if others is not None and others > 0.5:
        busy = (f" - other work competed for the CPUs (1-minute load up to {others:.1f} above this run's own "
                f"{hw['threads']} threads): CPU timings are noisy")
    return [
        f"model: {model['source']} ({model['generation']}), {model['num_layers']} of {model['full_num_layers']} "
        f"layers, {model['parameters'] / 1e9:.2f} B parameters",
        f"prompt: {cfg['batch']} x {cfg['prompt_len']} tokens (seed {cfg['seed']}), {cfg['gen_len']} generated, "
        f"greedy; warm-up {cfg['warmup']}, repeats {cfg['repeat']}",
        f"CPU: {cpu['model']}, {cpu['physical_cores'] or '?'} cores / {cpu['logical_cpus']} logical CPUs "
        f"({cpu['usable_cpus']} usable), {hw['threads']} threads",
        f"GPU: {gpus}; torch {sw['torch']} (CUDA {sw['torch_cuda'] or '-'})",
        f"glmrt {sw['glmrt']}, commit {sw['commit']}{dirty}; transformers {sw['transformers'] or 'not installed'}; "
        f"Python {sw['python']}; {hw['os']}",
        f"run at {doc['created_utc']}; system load (1/5/15 min) at start {_load_text(load['start'])}, at end "
        f"{_load_text(load['end'])}{busy}",
    ] + tensor_parallel_lines(doc)


def tensor_parallel_lines(doc: dict) -> list[str]:
    """A tensor-parallel run's size and transport, and each setting's collectives' share of decode."""
    tp = doc.get("tensor_parallel")
    if not tp:
        return []
    lines = [f"tensor parallel: {tp['size']} ranks over {tp['transport']} (launched by {tp['launcher']}), "
             f"{tp['threads_per_rank']} thread(s) per rank; every rank ran each setting in lockstep, rank 0 reports"]
    for r in doc.get("results", []):
        t = r.get("tensor_parallel")
        if r.get("status") == "ok" and t:
            lines.append(f"{r['id']}: collectives {_fmt(t['decode_comm_s_per_step'], '.2f', 1e3)} ms per decode "
                         f"step, {_fmt(t['decode_comm_share'], '.1f', 100)}% of decode on rank 0 "
                         f"({_fmt(t['decode_comm_share_slowest_rank'], '.1f', 100)}% on the slowest rank); per step "
                         + ", ".join(f"{v:g} {k}" for k, v in sorted(t["collectives_per_decode_step"].items())))
    return lines


def competing_load(doc: dict) -> float | None:
    """The most load any CPU setting saw beyond its own threads (1-minute average), or None if unknown."""
    threads = doc["hardware"]["threads"]
    seen = [v for r in doc.get("results", []) if r.get("status") == "ok" and r["device"].startswith("cpu")
            for v in (r["system_load"]["before_1min"], r["system_load"]["after_1min"]) if v is not None]
    start = (doc["hardware"]["load_average"]["start"] or [None])[0]
    if start is not None:
        seen.append(start + threads)  # before any worker ran: all of it was other work
    return max(seen) - threads if seen else None


def _load_text(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "unknown"


def bandwidth_lines(doc: dict) -> list[str]:
    out = []
    for device, bw in doc["device_bandwidth"].items():
        value = f"{bw['bytes_per_s'] / 1e9:.1f} GB/s" if bw.get("bytes_per_s") else "unknown"
        what = bw.get("method") or bw.get("source", "")
        line = f"{device}: {value} ({what})"
        copy = bw.get("measured_copy")
        if copy:
            line += f"; measured copy {copy['bytes_per_s'] / 1e9:.0f} GB/s ({copy['method']})"
        out.append(line)
    return out


def spread_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """min / median / max over the timed runs of each setting."""
    columns = (("TTFT ms", ("ttft_s",), ".1f", 1e3), ("TPOT ms (per run)", ("tpot_s", "per_run"), ".2f", 1e3),
               ("decode tok/s", ("decode_tokens_per_s",), ".2f", 1),
               ("prefill tok/s", ("prefill_tokens_per_s",), ".1f", 1))
    rows = []
    for r in results:
        row = [r["id"]]
        for _, path, spec, scale in columns:
            s = r
            for key in path:
                s = s[key]
            row.append(" / ".join(_fmt(s[k], spec, scale) for k in ("min", "median", "max")))
        row.append(f"{_fmt(r['system_load']['before_1min'], '.1f')} / {_fmt(r['system_load']['after_1min'], '.1f')}")
        rows.append(row)
    return ["setting"] + [c[0] for c in columns] + ["system load before / after"], rows


def render_markdown(doc: dict) -> str:
    header, rows = table_rows(doc["results"])
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    parts = [f"# glmrt bench: {doc['model']['source']}, {doc['model']['num_layers']} layers", ""]
    parts += [f"- {line}" for line in stamp_lines(doc)]
    parts += ["", "Command:", "", "```", doc["command"], "```", "", "## Results", "", markdown_table(header, rows), ""]
    parts += ["Device bandwidth the `% dev BW` column divides by:", ""]
    parts += [f"- {line}" for line in bandwidth_lines(doc)] + [""]
    parts += ["## Spread over repeats (min / median / max)", "", markdown_table(*spread_rows(ok)), ""]
    estimates = [r for r in ok if r.get("full_depth")]
    if estimates:
        full = estimates[0]["full_depth"]["full_num_layers"]
        parts += [f"## Per-layer cost and full-depth ({full} layers) estimate", "",
                  "Estimated by scaling TPOT with the bytes each decode step reads (the achieved bandwidth is "
                  "assumed to stay the same); an estimate, not a measurement, fair only where the run is "
                  "bandwidth-bound (see `% dev BW`).", "",
                  markdown_table(["setting", "bytes/step MB", "per layer ms", "LM head + embedding ms",
                                  f"TPOT ms at {full} layers", f"decode tok/s at {full} layers"],
                                 [[r["id"], _fmt(r["bandwidth"]["bytes_per_step"], ".1f", 1e-6),
                                   _fmt(r["full_depth"]["per_layer_tpot_s"], ".2f", 1e3),
                                   _fmt(r["full_depth"]["fixed_tpot_s"], ".2f", 1e3),
                                   _fmt(r["full_depth"]["tpot_s_full"], ".1f", 1e3),
                                   _fmt(r["full_depth"]["decode_tokens_per_s_full"], ".2f")] for r in estimates]), ""]
    parts += ["## What each setting is", ""]
    for r in doc["results"]:
        if r["status"] != "ok":
            parts.append(f"- `{r['id']}`: failed: {r['error']}")
            continue
        extra = ""
        if r.get("plan"):
            nodes = r["plan"]["nodes"]
            extra = (f"; plan: {nodes.get('native', 0)} native, {nodes.get('vendor', 0)} vendor, "
                     f"{nodes.get('reference', 0)} reference nodes")
            if r["plan"]["fallback_ops"]:
                extra += f" (reference fallback for {', '.join(r['plan']['fallback_ops'])})"
        if r.get("native") is not None:
            extra += f"; native module built: {r['native'].get('built')}"
        parts.append(f"- `{r['id']}`: {r['label']}{extra}")
    parts += ["", f"Drift reference: {doc['reference']['description']}.", ""]
    if doc["skipped"]:
        parts += ["## Skipped", ""] + [f"- {s['setting']}: {s['reason']}" for s in doc["skipped"]] + [""]
    parts += ["## Definitions", ""] + [f"- {n}" for n in doc["metric_notes"]] + [""]
    return "\n".join(parts)


def render_plot(doc: dict, path: Path) -> str | None:
    """decode tokens/s (bars: mean, whiskers: min-max over repeats) and drift per setting; returns
    why no plot was written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    if not ok:
        return "no setting finished"
    ids = [r["id"] for r in ok]
    colors = ["tab:blue" if r["runner"] == "glmrt" else "tab:gray" for r in ok]
    x = list(range(len(ok)))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 1.1 * len(ok) + 2), 9), sharex=True)
    decode = [r["decode_tokens_per_s"]["mean"] for r in ok]
    low = [d - r["decode_tokens_per_s"]["min"] for d, r in zip(decode, ok)]
    high = [r["decode_tokens_per_s"]["max"] - d for d, r in zip(decode, ok)]
    axes[0].bar(x, decode, color=colors, yerr=[[max(v, 0) for v in low], [max(v, 0) for v in high]], capsize=3)
    axes[0].set_ylabel("decode tokens/s")
    for xi, d in zip(x, decode):
        axes[0].annotate(f"{d:.1f}", (xi, d), ha="center", va="bottom", fontsize=8)
    floor = 1e-12
    for ax, key, label in ((axes[1], "max_abs_logit_diff", "max |logit diff|"), (axes[2], "mean_kl", "mean KL")):
        values = [max(r["drift"][key], floor) for r in ok]
        ax.bar(x, values, color=colors)
        ax.set_yscale("log")
        ax.set_ylabel(f"{label}\nvs fp32 CPU reference")
        for xi, r in zip(x, ok):
            ax.annotate(f"{r['drift'][key]:.1e}", (xi, max(r["drift"][key], floor)), ha="center", va="bottom",
                        fontsize=7)
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(ids, rotation=30, ha="right", fontsize=8)
    model = doc["model"]
    fig.suptitle(f"glmrt bench: {model['source']} ({model['num_layers']} layers), batch {doc['config']['batch']}, "
                 f"{doc['hardware']['threads']} threads\n{doc['hardware']['cpu']['model']}; "
                 f"commit {doc['software']['commit'][:12]} (blue: glmrt, grey: baselines)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(doc), encoding="utf-8")
    why_not = render_plot(doc, out / "results.png")
    if why_not:
        _log(f"glmrt bench: no plot: {why_not}")


def print_report(doc: dict) -> None:
    print("\n".join(stamp_lines(doc)))
    print(text_table(*table_rows(doc["results"])))
    for line in bandwidth_lines(doc):
        print(f"device bandwidth: {line}")
    for r in doc["results"]:
        if r["status"] == "ok" and r["runner"] != "glmrt":
            print(f"{r['id']}: {r['label']}")
    for s in doc["skipped"]:
        print(f"skipped {s['setting']}: {s['reason']}")
    if doc["config"]["out"]:
        print(f"written: {Path(doc['config']['out']) / 'results.json'}, results.md, results.png")


def load_results(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "glmrt-bench":
        raise InputError(f"{path} is not a glmrt bench results.json")
    return doc


def schema_problems(doc: dict) -> list[str]:
    """Where `doc` breaks schema.json ([] if valid, or if jsonschema is not installed)."""
    try:
        import jsonschema
    except ImportError:
        return []
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


def _ratio(a, b) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def compare_runs(a: dict, b: dict, a_name: str = "A", b_name: str = "B") -> str:
    """Two runs side by side: every setting present in either, B/A ratios where both ran it."""
    lines = []
    for name, doc in ((a_name, a), (b_name, b)):
        lines.append(f"{name}: {doc['command']}")
        lines += [f"    {line}" for line in stamp_lines(doc)]
    keys = ("model", "batch", "prompt_len", "gen_len", "threads", "seed")
    differ = [k for k in keys if (a["model"]["source"] if k == "model" else a["config"][k])
              != (b["model"]["source"] if k == "model" else b["config"][k])]
    if a["model"]["num_layers"] != b["model"]["num_layers"]:
        differ.append("layers")
    if differ:
        lines.append(f"note: the runs differ in {', '.join(differ)}: the ratios compare different work")
    if a["hardware"]["cpu"]["model"] != b["hardware"]["cpu"]["model"] or \
            [g["name"] for g in a["hardware"]["gpus"]] != [g["name"] for g in b["hardware"]["gpus"]]:
        lines.append("note: the runs were made on different hardware")
    by_a = {r["id"]: r for r in a["results"]}
    by_b = {r["id"]: r for r in b["results"]}
    order = list(by_a) + [i for i in by_b if i not in by_a]

    def value(r, path):
        if r is None or r.get("status") != "ok":
            return None
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None
        return r

    metrics = (("decode tok/s", ("decode_tokens_per_s", "mean"), ".2f", 1),
               ("TTFT ms", ("ttft_s", "median"), ".1f", 1e3),
               ("TPOT ms", ("tpot_s", "mean"), ".2f", 1e3),
               ("peak MiB", ("peak_memory", "bytes"), ".0f", 1 / 2**20),
               ("max|dlogit|", ("drift", "max_abs_logit_diff"), ".2e", 1))
    header = ["setting"]
    for label, *_ in metrics:
        header += [f"{a_name} {label}", f"{b_name} {label}", f"{b_name}/{a_name}"]
    rows = []
    for sid in order:
        ra, rb = by_a.get(sid), by_b.get(sid)
        row = [sid + ("" if ra and rb else f" (only in {a_name if ra else b_name})")]
        for _, path, spec, scale in metrics:
            va, vb = value(ra, path), value(rb, path)
            row += [_fmt(va, spec, scale), _fmt(vb, spec, scale), _ratio(va, vb)]
        rows.append(row)
    lines.append(text_table(header, rows))
    lines.append(f"ratios are {b_name} / {a_name}: above 1 is faster for tokens/s, slower for TTFT and TPOT")
    return "\n".join(lines)
