"""`glmrt export MODEL --format onnx --out DIR ...` (flags and defaults from export_onnx)."""

from __future__ import annotations

import inspect
import json


def register(sub) -> None:
    from . import ACCURACY_LEVELS, FLAVORS, export_onnx
    defaults = {k: v.default for k, v in inspect.signature(export_onnx).parameters.items()}
    p = sub.add_parser("export", help="export a model to ONNX (model.onnx + one external-data file + glmrt_onnx.json)")
    p.add_argument("model", help="checkpoint directory or synthetic:<preset>")
    p.add_argument("--format", required=True, choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", required=True, help="output directory (created; an earlier glmrt export there is replaced)")
    p.add_argument("--dtype", default=defaults["dtype"], help="float32 | float16 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--quantize", default=defaults["quantize"],
                   help="int8 | int4 | int4-g32 | int4-g64 | int4-g128: weight-only quantized linears")
    p.add_argument("--flavor", default=defaults["flavor"], choices=sorted(FLAVORS),
                   help="ort: opset 21 + onnxruntime's com.microsoft ops; standard: opset 23 standard ops only "
                        f"(default: {defaults['flavor']})")
    p.add_argument("--layers", type=int, default=defaults["layers"], help="keep only the first N layers")
    p.add_argument("--accuracy-level", type=int, default=defaults["accuracy_level"], choices=ACCURACY_LEVELS,
                   help="MatMulNBits accuracy_level for quantized weights: 1 fp32 activations ... 4 int8 "
                        f"activations (default: {defaults['accuracy_level']})")
    p.add_argument("--no-gqa", dest="gqa", action="store_false",
                   help="ort flavor: write attention as standard ops instead of GroupQueryAttention")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip onnx.checker on the written file")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args) -> int:
    from . import read_manifest, export_onnx
    out = export_onnx(args.model, args.out, dtype=args.dtype, quantize=args.quantize, flavor=args.flavor,
                      layers=args.layers, accuracy_level=args.accuracy_level, gqa=args.gqa, check=args.check,
                      progress=not args.json)
    m = read_manifest(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    summary = {"out": str(out), "generation": m["generation"], "flavor": m["flavor"], "dtype": m["dtype"],
               "quantization": m["quantization"] and {k: m["quantization"][k] for k in ("bits", "group_size",
                                                                                        "accuracy_level", "op")},
               "attention": m["attention"], "bytes": size, "nodes": sum(m["ops"].values()),
               "position_ids": m["position_ids"]["rule"], "tokenizer_files": m["tokenizer_files"]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {out}: {m['generation']}, {m['flavor']} flavor, {m['dtype']}, {summary['nodes']} nodes, "
              f"{size / 1e6:.1f} MB; attention: {m['attention']}; position_ids rule: {m['position_ids']['rule']}")
        if m["quantization"]:
            q = m["quantization"]
            print(f"  weights: INT{q['bits']} ({'per row' if not q['group_size'] else 'groups of ' + str(q['group_size'])})"
                  f" as {q['op']}, accuracy_level {q['accuracy_level']}")
        print(f"  run it: glmrt run {out}    (or onnxruntime directly: see {out}/glmrt_onnx.json)")
    return 0
