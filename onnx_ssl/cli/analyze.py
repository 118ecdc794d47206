"""``onnx-ssl analyze``: the channel spaces and SSL groups of a model, as a table or JSON.

The table and its summary are always printed: on stdout, or on stderr when ``--json -``
puts the JSON on stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from onnx_ssl.groups import DEFAULT_KINDS, KINDS

if TYPE_CHECKING:
    from onnx_ssl.groups import Analysis


def register(sub: Any) -> None:
    a = sub.add_parser("analyze", help="list channel spaces and SSL groups of a model",
                       description="Print the model's layers with their channel spaces, "
                                   "blocked spaces with their reasons and a summary of what "
                                   "is prunable; --json also writes the analysis "
                                   "(docs/contract.md).")
    a.add_argument("model", help="input .onnx (or builtin:NAME for a model from onnx_ssl/models/)")
    a.add_argument("--json", metavar="OUT",
                   help="also write the analysis as JSON to OUT ('-': stdout, and the table "
                        "goes to stderr); see docs/contract.md")
    a.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"group kinds: {','.join(KINDS)} (default {','.join(DEFAULT_KINDS)})")
    a.add_argument("--bind-batch", type=int, default=None, metavar="N",
                   help="bind a symbolic batch dim of the inputs to N, for a model whose batch "
                        "is declared dynamic but does not run at other sizes (the result is "
                        "static at N)")
    a.set_defaults(func=run)


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def summary(a: Analysis, initializer_params: int | None = None) -> list[str]:
    """What a user can act on: the prunable share of the channels and of the MACs, and what
    the params count."""
    ch_total = sum(s.channels for s in a.spaces)
    ch_prunable = sum(s.channels for s in a.spaces if s.prunable)
    prunable = {s.id for s in a.spaces if s.prunable}
    macs_prunable = sum(la.macs for la in a.layers
                        if la.out_space in prunable or la.in_space in prunable)
    macs = (f"{_share(macs_prunable, a.macs)} of the MACs ({macs_prunable:,} of {a.macs:,}"
            f"{' per sample' if a.macs_per_sample else ''}) are in layers that read or write "
            f"a prunable space" if a.macs else "the MACs are not static")
    lines = [f"prunable: {_share(ch_prunable, ch_total)} of the channels ({ch_prunable:,} of "
             f"{ch_total:,}, in {len(prunable)} of {len(a.spaces)} spaces); {macs}"]
    heads = [g for g in a.groups if g.kind == "head"]
    if heads:
        ok = [g for g in heads if g.prunable]
        weights = {x.tensor for g in ok for x in g.members}
        macs_heads = sum(la.macs for la in a.layers if la.weight in weights)
        lines.append(
            f"heads: {len(ok)} of {len(heads)} prunable, in "
            f"{len({g.node for g in ok})} of {len({g.node for g in heads})} attentions"
            + (f"; their Q/K/V and output projections hold {_share(macs_heads, a.macs)} of "
               f"the MACs" if a.macs and ok else ""))
        blocked: dict[str, str] = {}  # attention -> why its heads stay (one line each)
        for g in heads:
            if not g.prunable and g.reason is not None and g.node is not None:
                blocked.setdefault(g.node, g.reason.text)
        lines += [f"  {node}: {why}" for node, why in blocked.items()]
    counted = (f"params: {a.params:,} in the weights and biases of the {len(a.layers)} "
               f"Conv/ConvTranspose/Gemm/MatMul layers (the table's column)")
    if initializer_params is not None:
        counted += (f"; the model stores {initializer_params:,} in all its initializers "
                    f"(norms, embeddings and other constants included)")
    return [*lines, counted]


def run(args: argparse.Namespace) -> int:
    from onnx_ssl.analysis import analyze, bind_batch_to, format_table
    from onnx_ssl.io import check_writable, initializer_elements, write_text_atomic
    from onnx_ssl.loading import input_files, load

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    to_stdout = args.json == "-"
    if args.json and not to_stdout:
        check_writable(args.json, *input_files(args.model))
    model = bind_batch_to(load(args.model), args.bind_batch)
    a = analyze(model, kinds=kinds, name=str(args.model))
    report = sys.stderr if to_stdout else sys.stdout
    print(format_table(a), file=report)
    print("\n".join(summary(a, initializer_elements(model))), file=report)
    if to_stdout:
        sys.stdout.write(a.dumps() + "\n")
    elif args.json:
        write_text_atomic(args.json, a.dumps() + "\n")
        print(f"wrote {args.json}: {len(a.spaces)} spaces, {len(a.groups)} groups",
              file=sys.stderr)
    return 0
