"""``run_opcheck``: the one wrapper around :func:`torch.library.opcheck` used by every op family.

Usage (tests/conftest.py puts the tests directory on ``sys.path``, so this works from any family folder)::

    from opcheck import run_opcheck

    run_opcheck(torch.ops.difforge.adaln_modulate.default, (x, scale, shift, None, None, "layernorm", 1e-6, 1, None, 0))

Runs the requested opcheck utilities (by default schema, autograd registration, fake tensor and
AOT-dispatch with dynamic shapes) without stopping at the first failure, and fails the calling test with
one readable message listing every utility that did not report "SUCCESS", its exception, and a summary of
the sample arguments (shapes, dtypes, devices, requires_grad). Returns opcheck's result dict.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import torch

DEFAULT_TEST_UTILS: tuple[str, ...] = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)

__all__ = ["DEFAULT_TEST_UTILS", "describe_args", "run_opcheck"]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        grad = ", requires_grad" if value.requires_grad else ""
        contig = "" if value.is_contiguous() else f", strides={tuple(value.stride())}"
        return f"Tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} {value.device}{contig}{grad}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def describe_args(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> str:
    """One line per argument: a readable summary of opcheck's sample inputs."""
    lines = [f"  arg{i}: {_describe(a)}" for i, a in enumerate(args)]
    lines += [f"  {k}=: {_describe(v)}" for k, v in (kwargs or {}).items()]
    return "\n".join(lines)


def _format_failure(value: Any) -> str:
    if isinstance(value, BaseException):
        text = "".join(traceback.format_exception_only(type(value), value)).strip()
        cause = value.__cause__ or value.__context__
        if cause is not None:
            text += "\n      caused by: " + "".join(traceback.format_exception_only(type(cause), cause)).strip()
        return text
    return repr(value)


def run_opcheck(
    op: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    test_utils: str | Sequence[str] = DEFAULT_TEST_UTILS,
    atol: float | None = None,
    rtol: float | None = None,
) -> dict[str, str]:
    """Run ``torch.library.opcheck(op, args, kwargs, test_utils=...)`` and assert every utility succeeded.

    ``op``: an OpOverload / OpOverloadPacket from ``torch.ops.*`` or a ``torch.library.custom_op``.
    Raises AssertionError naming each failing utility with its exception and the sample arguments.
    """
    utils = (test_utils,) if isinstance(test_utils, str) else tuple(test_utils)
    result = torch.library.opcheck(
        op, tuple(args), dict(kwargs or {}), test_utils=utils, raise_exception=False, atol=atol, rtol=rtol
    )
    missing = [u for u in utils if u not in result]
    failures = {name: status for name, status in result.items() if status != "SUCCESS"}
    if failures or missing:
        name = getattr(op, "_name", None) or getattr(op, "__name__", None) or repr(op)
        lines = [f"opcheck failed for {name}:"]
        for util, status in failures.items():
            lines.append(f"  {util}: {_format_failure(status)}")
        for util in missing:
            lines.append(f"  {util}: did not run (not in opcheck's result)")
        lines.append("sample inputs:")
        lines.append(describe_args(args, kwargs))
        raise AssertionError("\n".join(lines))
    return result
