"""`difforge` command line: `difforge info`, `difforge demo`."""

from __future__ import annotations

import argparse
import sys

import torch


def _registered_ops() -> list[str]:
    # torch.ops.difforge creates attributes lazily; the dispatcher knows every registered schema.
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1] for n in names if n.startswith("difforge::"))


def info(_args: argparse.Namespace) -> int:
    import difforge
    from difforge import _library

    build = _library.build_info()
    cuda_built = build.get("cuda_compiled", "OFF") in ("ON", "TRUE", "1")
    rows = [
        ("difforge", difforge.__version__),
        ("library", str(difforge.library_path)),
        ("torch", f"{torch.__version__} (built against {build.get('built_with_torch', '?')})"),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("CUDA kernels", f"compiled for {build.get('cuda_archs')}" if cuda_built else "not compiled"),
        ("GPU available", torch.cuda.get_device_name() if torch.cuda.is_available() else "no"),
        ("compilers", f"{build.get('cxx_compiler', '?')}; {build.get('cuda_compiler', '').strip() or 'no nvcc'}"),
        ("build type", build.get("build_type", "?")),
        ("threads", str(torch.get_num_threads())),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("ops (torch.ops.difforge):")
    for op in _registered_ops():
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"difforge::{op}", k)]
        print(f"  {op:<28} {', '.join(keys)}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from difforge.demo import run

    return run(device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="difforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the build configuration and the registered ops").set_defaults(func=info)
    p = sub.add_parser("demo", help="run the main job end to end and print the bench table")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
