"""How the tests compare a result with its reference.

assert_close_to_reference is the rule of flash-attn's tests: a kernel's error against a float64 reference
may be at most twice the error of a low-precision torch baseline (the same math in the kernel's dtype)
against that reference, plus a small floor for where the baseline happens to be exact. assert_close is a
fixed bound, |actual - expected| <= atol + rtol |expected|, for exact and ulp-level checks; assert_equal
compares bits. A failure names the tensor, the largest error and its index, the two values there, the
bound (and the baseline's error), and how many elements are beyond it.
"""

import numpy as np
import torch

# The floor of the baseline rule per dtype of the result.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _index(flat, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat), tuple(shape))) if len(shape) else ()


def _check_shapes(name, actual, expected):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"


def _check_non_finite(name, got, want, equal_nan=False):
    """NaN only where allowed; +-inf exactly where the expected value has it. Returns the mask of the
    elements whose error is measured (both finite)."""
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    bad = (nan_got != nan_want) if equal_nan else (nan_got | nan_want)
    bad |= torch.isinf(want) & (got != want)
    bad |= torch.isinf(got) & ~torch.isinf(want) & ~nan_want
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        where = _index(i, got.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values differ from the expected ones, first at "
                             f"{where}: actual {got.reshape(-1)[i].item()!r}, expected {want.reshape(-1)[i].item()!r}")
    return torch.isfinite(want)


def _assert_within(name, got, want, err, bound, base_err=None):
    """err <= bound elementwise (bound broadcasts), else a message about the largest error and the element
    furthest beyond its bound."""
    bound = bound.expand_as(err)
    excess = err - bound
    if not (excess > 0).any():
        return

    def describe(i):
        text = (f"at {_index(i, err.shape)}: error {err.reshape(-1)[i].item():.3g} (actual "
                f"{got.reshape(-1)[i].item():.7g}, expected {want.reshape(-1)[i].item():.7g}), bound "
                f"{bound.reshape(-1)[i].item():.3g}")
        if base_err is not None:
            text += f" (baseline error {base_err.expand_as(err).reshape(-1)[i].item():.3g})"
        return text

    worst, furthest = int(err.argmax()), int(excess.argmax())
    message = (f"{name}: {int((excess > 0).sum())} of {err.numel()} elements beyond the bound; max error "
               f"{describe(worst)}")
    if furthest != worst:
        message += f"; furthest beyond its bound {describe(furthest)}"
    raise AssertionError(message)


def assert_close_to_reference(actual, reference, baseline=None, floor=None, *, name="result", relative_floor=False,
                              elementwise=False, equal_nan=False, multiple=2.0):
    """|actual - reference| <= multiple |baseline - reference| + floor, flash-attn's rule (multiple 2).

    reference is float64 (or at least more precise than actual); baseline is the same computation in
    actual's precision (None: no baseline, the floor alone). floor defaults to FLOOR[actual.dtype]; with
    relative_floor it scales with the reference's magnitude, never by less than 1. By default the errors are
    the tensors' maxima (one bound for the whole tensor); elementwise bounds each element by its own
    baseline error and magnitude. NaN fails unless equal_nan (then it must meet NaN, the rule holds on the
    finite elements, and where the baseline alone is not finite its largest finite error stands in); an
    infinite reference value must be matched exactly.
    """
    actual, reference = _as_tensor(actual), _as_tensor(reference)
    _check_shapes(name, actual, reference)
    floor = FLOOR[actual.dtype] if floor is None else floor
    got, want = actual.double(), reference.double()
    finite = _check_non_finite(name, got, want, equal_nan)
    if got.numel() == 0:
        return
    err = (got - want).abs().where(finite, 0.0)
    base_err = torch.zeros_like(err)
    if baseline is not None:
        base = _as_tensor(baseline).double()
        _check_shapes(f"{name} baseline", base, want)
        base_err = (base - want).abs().where(finite, 0.0)
        if equal_nan:  # a low-precision baseline may spread NaN wider (torch's bf16 CPU GEMM mixes rows)
            base_err = base_err.where(torch.isfinite(base_err), base_err.nan_to_num(0.0, posinf=0.0).max())
        assert torch.isfinite(base_err).all(), f"{name}: the baseline is not finite where the reference is"
    magnitude = want.abs().where(finite, 0.0).clamp(min=1.0) if relative_floor else torch.ones_like(want)
    if not elementwise:
        base_err, magnitude = base_err.max(), magnitude.max()
    _assert_within(name, got, want, err, multiple * base_err + floor * magnitude, base_err)


def assert_close(actual, expected, *, atol=0.0, rtol=0.0, rtol_of_max=0.0, name="result", equal_nan=False):
    """|actual - expected| <= atol + rtol |expected| + rtol_of_max max|expected|, elementwise.

    atol and rtol may be tensors (broadcast against expected); rtol_of_max bounds the error relative to the
    tensor's scale, for values that pass near 0. NaN fails unless equal_nan (then it must meet NaN); an
    infinite expected value must be matched exactly. Numpy arrays are taken too.
    """
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    _check_shapes(name, actual, expected)
    got, want = actual.double(), expected.double()
    finite = _check_non_finite(name, got, want, equal_nan)
    if got.numel() == 0:
        return
    err = (got - want).abs().where(finite, 0.0)
    magnitude = want.abs().where(finite, 0.0)
    atol, rtol = (torch.as_tensor(t, dtype=torch.float64, device=got.device) for t in (atol, rtol))
    bound = atol + rtol * magnitude + rtol_of_max * magnitude.max()
    _assert_within(name, got, want, err, bound.where(finite, torch.inf))


def assert_equal(actual, expected, *, name="result", nan_equal=False):
    """Bit-for-bit equality (so -0.0 differs from 0.0); with nan_equal any NaN matches any NaN."""
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    _check_shapes(name, actual, expected)
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype}, expected {expected.dtype}"
    a, e = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    if a.dtype in _BITS:
        differ = a.view(_BITS[a.dtype]) != e.view(_BITS[e.dtype])
        if nan_equal:
            differ &= ~(torch.isnan(a) & torch.isnan(e))
    else:
        differ = a != e
    if not differ.any():
        return
    flat = differ.reshape(-1)
    i = int(flat.nonzero()[0])
    a_flat, e_flat = a.reshape(-1), e.reshape(-1)
    message = (f"{name}: {int(flat.sum())} of {flat.numel()} elements differ, first at {_index(i, a.shape)}: actual "
               f"{a_flat[i].item()!r}, expected {e_flat[i].item()!r}")
    if a.dtype in _BITS:
        err = (a_flat[flat].double() - e_flat[flat].double()).abs()
        err = err[~torch.isnan(err)]
        mask = (1 << (8 * a.element_size())) - 1
        message += (f" (bits 0x{int(a.view(_BITS[a.dtype]).reshape(-1)[i]) & mask:x} vs "
                    f"0x{int(e.view(_BITS[e.dtype]).reshape(-1)[i]) & mask:x}); max abs error "
                    f"{err.max().item() if err.numel() else float('nan'):.3g}")
    raise AssertionError(message)
