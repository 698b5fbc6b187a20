"""Random directions v for weight-perturbation estimators — the one place they are drawn.

Every forward-gradient and zeroth-order estimator asks this module for its
directions, so a faster or different sampler changes all of them at once.

``gaussian`` and ``rademacher`` are standardised: E[v] = 0 and E[v vᵀ] = I,
which is what makes g = (∇f·v) v unbiased, E[g] = E[v vᵀ] ∇f = ∇f (Baydin et
al. 2022, "Gradients without Backpropagation", Thm. 1).

* ``gaussian``    — v ~ N(0, I).
* ``rademacher``  — v_i = ±1 with probability ½ each. ‖v‖² = N exactly, so
  for K = 1 the estimate's second moment is E‖g‖² = N‖∇f‖² instead of the
  Gaussian (N + 2)‖∇f‖² (see ``bpfree.estimators.theory``).
* ``noise_table`` — a slice of one shared pre-drawn Gaussian table at a
  random offset: E[v] = 0 but E[v vᵀ] = C ≠ I, a known, measurable bias
  (below).

``orthogonal=True`` orthonormalises the K directions of one step jointly
(QR of the N×K matrix) and rescales them to length √N: each column of a
Haar-random N×K frame Q satisfies E[q qᵀ] = I/N, so v = √N q keeps
E[v vᵀ] = I and the average over K stays unbiased, while the K directions no
longer overlap (Kozak et al. 2021 / "orthogonal ES", Choromanski et al. 2018).

Noise table (``noise_table``, not unbiased)
--------------------------------------------
Evolution strategies at scale read every perturbation from one shared block
of Gaussian noise, drawn once, at a random offset, so a worker never draws
noise and only ships offsets (Salimans, Ho, Chen, Sidor, Sutskever 2017,
"Evolution Strategies as a Scalable Alternative to Reinforcement Learning",
§2.1, which notes that the perturbations are then not strictly independent
across iterations and reports no problem from it in practice). Their code
(openai/evolution-strategies-starter, ``SharedNoiseTable``) holds 250M fp32
values (1 GB) and draws offsets uniform on [0, L − n] without wrapping. Here:

* The table T holds L = ``NOISE_TABLE_SIZE`` values (default 2**24: 64 MiB in
  fp32), drawn from N(0, 1) with the fixed seed ``NOISE_TABLE_SEED`` and
  standardised in float64 so that mean(T) = 0 and mean(T²) = 1 exactly up
  to rounding, then rounded to the caller's dtype. One table per (L, dtype,
  device), built on first use (never at import) and kept
  (:func:`noise_table`); :func:`set_noise_table_size` changes L and frees
  the old tables.
* One ``fill_`` of n ≤ L values draws one offset o uniform on {0, …, L − 1}
  from the generator (:func:`noise_table_offset`) and writes the circular
  slice v_i = T[(o + i) mod L] (two copies when it wraps). Wrapping makes
  every table value equally likely at every position, so the moments below
  are exact. n > L is an error: the slice would repeat values inside one
  direction.
  :func:`table_slice` returns the same values without copying when the slice
  does not wrap (a read-only view of the shared table).

Its exact moments, over the L equally likely offsets:

    E[v_i]     = mean(T) = 0,
    E[v_i v_j] = C_ij = r((j − i) mod L),
    r(ℓ)       = (1/L) Σ_t T[t] T[(t + ℓ) mod L]   (the table's circular autocorrelation),

so C is symmetric Toeplitz with unit diagonal (r(0) = mean(T²) = 1), but its
off-diagonal entries are r(ℓ) ≈ N(0, 1/L), not 0. The forward gradient
g = (∇f·v) v then has

    E[g] = C ∇f,       bias b = (C − I) ∇f,

and each component of b is a sum of n − 1 terms r(j − i) ∇f_j of size
~1/√L and random sign, so ‖b‖ ≈ √((n − 1)/L) ‖∇f‖ (measured 0.334 ‖∇f‖
for one slice of n = 1.86M at L = 2**24, ``bench/noise_table.py``). C is
positive semi-definite, so ∇fᵀE[g] ≥ 0 always, and the bias is nearly
orthogonal to ∇f: ∇fᵀ(C − I)∇f = Σ_ℓ≠0 r(ℓ) Σ_i ∇f_i ∇f_(i+ℓ) has random sign
and, for a gradient whose own autocorrelation decays quickly, size
~√(2/L)‖∇f‖² (measured −2.2e-4 ‖∇f‖² for the MLP at L = 2**24), so
cos(E[g], ∇f) ≈ 1/√(1 + ‖b‖²/‖∇f‖²). :func:`noise_table_covariance_apply`
computes C x exactly (FFT), so the bias for a given gradient can be measured.

Offsets of different calls are independent and mean(T) = 0, so a direction
assembled from several calls has a block-diagonal E[v vᵀ], one C block per
call. Estimators draw through ``direction_set``, which fills each parameter's
(K·numel) block in pieces of ``CHUNK`` values, one call per piece: so one C
block per piece of a parameter's K directions (a parameter below CHUNK values
is one block of K·numel, each direction marginally C), and C_m ⊗ C_n for a
rank-1 ``nn.Linear`` direction a bᵀ (a and b are separate calls). Smaller
blocks mean a smaller bias: for the MLP at L = 2**24, 0.20 ‖∇f‖ for one block
per tensor (the dense draw before ``direction_set``), 0.053 for pieces of
CHUNK values (every dense direction now), 0.009 for the rank-1 default.

When to use it: the table replaces a draw by a copy (or nothing), but the
fixed bias never averages away. The mean of S independent estimates has
E‖ḡ − ∇f‖² = tr Cov(g)/S + ‖b‖² ≈ N‖∇f‖²/S + (n − 1)/L ‖∇f‖², so the
bias dominates only after S* ≈ N L/(n − 1) ≥ L averaged estimates. A copy
of 1.86M table values took 0.65 ms against 1.1 ms for Rademacher signs and
11.7 ms for ``randn`` (one noisy run; ``table_slice`` 0.08 ms). It is never
a default (the defaults are the fastest unbiased choice);
``orthogonal=True`` is refused with it (QR would re-mix the slice, and C
would no longer describe the directions).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch

DISTRIBUTIONS = ("gaussian", "rademacher", "noise_table")

# The noise table's length L (see the module docstring). Change it with
# set_noise_table_size(n), which also frees the tables built for the old L;
# tables are keyed by their length, so a stale table is never read.
NOISE_TABLE_SIZE = 1 << 24
NOISE_TABLE_SEED = 20170310  # fixed: the same table in every process (arXiv 1703.03864)

# True while this module allocates directions, so that memory instruments
# (``bpfree.measure.memory``) can attribute those bytes to "directions"
# without the estimators knowing about them. Observes only; changes nothing.
DRAWING: contextvars.ContextVar[bool] = contextvars.ContextVar("bpfree_drawing_directions", default=False)


@contextlib.contextmanager
def _drawing() -> Iterator[None]:
    token = DRAWING.set(True)
    try:
        yield
    finally:
        DRAWING.reset(token)


def check_distribution(distribution: str, *, orthogonal: bool = False) -> None:
    """Raise ``ValueError`` naming the valid choices if ``distribution`` is unknown, or if it
    cannot be combined with ``orthogonal=True`` (``noise_table``: see the module docstring)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown direction distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if orthogonal and distribution == "noise_table":
        raise ValueError(
            "orthogonal=True re-mixes the directions through a QR, so the noise table's covariance C "
            "(directions module docstring) no longer describes them; use orthogonal with "
            "distribution='gaussian', or noise_table without orthogonal"
        )


def sample(
    shape: tuple[int, ...] | torch.Size,
    *,
    distribution: str,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A new tensor of i.i.d. standardised entries drawn only from ``generator``.

    Drawn on the generator's device (a CPU generator with CUDA parameters
    samples on the CPU and copies), so the same generator state always gives
    the same values.
    """
    check_distribution(distribution)
    # noise_table draws only its offset from the generator and reads the table on the target device
    where = device if distribution == "noise_table" and device is not None else generator.device
    with _drawing():
        out = fill_(torch.empty(shape, dtype=dtype, device=where), distribution, generator)
        if device is not None and torch.device(device) != out.device:
            out = out.to(device)
    return out


def fill_(out: torch.Tensor, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """Overwrite the contiguous tensor ``out`` with standardised draws; return it.

    * gaussian: ``out.normal_(generator=g)``.
    * rademacher: signs from raw random bits. One int64 draw gives 64 signs;
      each byte indexes a 256 × 8 table of ±1 rows, so a draw of N signs costs
      N/64 random words and one gather — about 13x faster than ``randn`` on
      this CPU (0.35 ms vs 4.6 ms for N = 1.86M), where the uniform draws of
      ``randint(0, 2)`` or ``bernoulli_`` cost as much as ``randn``.
    * noise_table: one offset o from ``generator``, then ``out`` ← the circular
      slice T[o : o + n] of the shared table on ``out``'s device (two copies
      when it wraps). Not unbiased: E[v vᵀ] = C (module docstring).
    """
    if not out.is_contiguous():
        raise ValueError("fill_ needs a contiguous tensor")
    if distribution == "noise_table":
        flat, start = out.view(-1), 0
        for piece in _circular_slice(flat.numel(), generator, out.dtype, out.device):
            flat[start:start + piece.numel()].copy_(piece)
            start += piece.numel()
        return out
    if out.device != generator.device:
        return out.copy_(sample(out.shape, distribution=distribution, generator=generator, dtype=out.dtype))
    if distribution == "gaussian":
        return out.normal_(generator=generator)
    flat = out.view(-1)
    n = flat.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 63) // 64,), generator=generator, dtype=torch.int64,
                          device=out.device)
    table = _sign_table(out.dtype, out.device)
    octets = words.view(torch.uint8)[: (n + 7) // 8].int()
    whole = n // 8
    if whole:
        torch.index_select(table, 0, octets[:whole], out=flat[: whole * 8].view(whole, 8))
    if n % 8:
        flat[whole * 8:] = table[octets[whole]][: n % 8]
    return out


_SIGN_TABLES: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Row b holds the 8 bits of byte b as ±1 (bit 0 first)."""
    key = (dtype, str(device))
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype)
    return _SIGN_TABLES[key]


# --------------------------------------------------------------------------- the noise table

_NOISE_TABLES: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def set_noise_table_size(size: int) -> int:
    """Set L = ``NOISE_TABLE_SIZE`` for every later draw; free all built tables; return the old L.

    The bias of a noise-table direction of n values is about √(n/L)·‖∇f‖
    (module docstring), so a larger table means less bias and more memory
    (4L bytes per fp32 table). The table for the new L is built on first use.
    """
    global NOISE_TABLE_SIZE
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"noise table size must be an int >= 2 (it is standardised to mean 0), got {size!r}")
    old, NOISE_TABLE_SIZE = NOISE_TABLE_SIZE, size
    _NOISE_TABLES.clear()
    return old


def _standard_normal_table(size: int) -> torch.Tensor:
    """``size`` N(0, 1) draws from ``NOISE_TABLE_SEED``, shifted and scaled in float64 so that
    their mean is 0 and their mean square is 1 (up to float64 rounding)."""
    t = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(NOISE_TABLE_SEED))
    t -= t.mean()
    t /= t.square().mean().sqrt()
    return t


def noise_table(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shared table T of L = ``NOISE_TABLE_SIZE`` values in ``dtype`` on ``device``.

    Built on first use from the float64 table (the same values on every
    device, rounded once to ``dtype``) and kept until
    :func:`set_noise_table_size`. Callers must never write into it: every
    noise-table direction of this (L, dtype, device) reads it. It is built
    inside the first draw, so memory instruments count its bytes as direction
    memory of that step.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"the noise table holds floating-point values; got dtype {dtype}")
    device = torch.device(device)
    key = (NOISE_TABLE_SIZE, dtype, str(device))
    table = _NOISE_TABLES.get(key)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = _standard_normal_table(NOISE_TABLE_SIZE).to(dtype=dtype, device=device)
        _NOISE_TABLES[key] = table
    return table


def noise_table_offset(generator: torch.Generator, n: int = 1) -> int:
    """One offset o, uniform on {0, …, L − 1}, for a direction of ``n`` values (one ``randint`` draw).

    Raises ``ValueError`` when n > L: the circular slice would repeat table
    values within one direction.
    """
    size = NOISE_TABLE_SIZE
    if n > size:
        raise ValueError(
            f"a noise_table direction of {n} values needs a table of at least {n} values, but "
            f"NOISE_TABLE_SIZE is {size} (a longer slice would repeat values within one direction); "
            f"enlarge it with directions.set_noise_table_size({1 << (n - 1).bit_length()}) "
            f"(4 bytes per value in fp32) or use distribution='rademacher'"
        )
    return int(torch.randint(0, size, (1,), generator=generator, device=generator.device))


def table_slice(
    n: int,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The noise-table direction of ``n`` values that ``fill_`` would write, without copying.

    Same offset draw as ``fill_`` (same generator state, same values). When the
    slice does not wrap (o + n <= L) this is a **view of the shared table**:
    use it read-only (e.g. ``p.add_(v, alpha=eps)``), never scale it in place.
    When it wraps, a new tensor of the two pieces.
    """
    pieces = _circular_slice(n, generator, dtype, device)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _circular_slice(n: int, generator: torch.Generator, dtype: torch.dtype,
                    device: torch.device | str) -> list[torch.Tensor]:
    """The circular slice T[o : o + n] of the shared table, o drawn by :func:`noise_table_offset`,
    as views: one, or two when it wraps past the table's end (T[o:] then T[: o + n − L])."""
    table = noise_table(dtype, device)
    o = noise_table_offset(generator, n)
    head = min(n, table.numel() - o)
    return [table[o:o + head]] + ([table[: n - head]] if head < n else [])


def noise_table_autocorrelation(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """r(ℓ) = (1/L) Σ_t T[t] T[(t + ℓ) mod L] for ℓ = 0 … L − 1, in float64.

    Computed by Wiener–Khinchin, r = IFFT(|FFT(T)|²)/L, from the table as
    stored in ``dtype`` (its rounded values are the ones directions read).
    r(0) = mean(T²) = 1 and r(ℓ) = r(L − ℓ). Memory: a few float64 copies of
    the table (about 0.5 GiB at L = 2**24).
    """
    t = noise_table(dtype, "cpu").double()
    spectrum = torch.fft.rfft(t)
    return torch.fft.irfft(spectrum.real.square() + spectrum.imag.square(), n=t.numel()) / t.numel()


def noise_table_covariance_apply(
    x: torch.Tensor,
    *,
    autocorrelation: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C x in float64, for x of shape (..., n) with n <= L: the exact E[v vᵀ] x of one noise-table call.

    C_ij = r((j − i) mod L), so (C x)_i = Σ_j r((j − i) mod L) x_j is a circular
    cross-correlation of r with x zero-padded to L; because r(ℓ) = r(L − ℓ) and
    |i − j| < n, a circulant of any length M >= 2n − 1 holding r(0 … n − 1)
    and its mirror gives the same sums, so M is the smaller of L and the next
    power of two >= 2n − 1. Applied along the last axis (each row its own
    call). With x = ∇f, (C − I)x = ``noise_table_covariance_apply(x) − x`` is
    the forward gradient's bias. Pass ``autocorrelation`` (from
    :func:`noise_table_autocorrelation`) to reuse it across calls.
    """
    r = noise_table_autocorrelation(dtype) if autocorrelation is None else autocorrelation.double()
    size = r.numel()
    n = x.shape[-1]
    if n > size:
        raise ValueError(f"x has {n} values per row, more than the table's L = {size}: no single direction is that long")
    m = 1 << max(2 * n - 2, 0).bit_length()
    if m >= size:
        c, m = r, size
    else:
        c = torch.zeros(m, dtype=torch.float64, device=r.device)
        c[:n] = r[:n]
        if n > 1:
            c[m - n + 1:] = r[1:n].flip(0)
    y = torch.fft.irfft(torch.fft.rfft(c) * torch.fft.rfft(x.double(), n=m), n=m)
    return y[..., :n]


def sample_like(
    tensors: list[torch.Tensor],
    *,
    num_directions: int | None,
    distribution: str,
    generator: torch.Generator,
    orthogonal: bool = False,
) -> list[torch.Tensor]:
    """One direction per tensor, jointly across all tensors.

    With ``num_directions=None`` every direction is its own tensor shaped like
    (and in the dtype and device of) its tensor — what forward-mode AD needs
    to use it as a tangent without copying it. With K directions, one flat
    ``(K, N)`` block (N = total number of elements) is drawn and returned as
    views shaped ``(K, *t.shape)``.

    With ``orthogonal=True`` the K rows are orthonormalised over all N
    coordinates and rescaled to norm √N (unbiased, see module docstring).
    """
    if not tensors:
        return []
    if num_directions is None and not orthogonal:
        with _drawing():
            return [fill_(torch.empty_like(t, memory_format=torch.contiguous_format), distribution, generator)
                    for t in tensors]
    k = 1 if num_directions is None else num_directions
    sizes = [t.numel() for t in tensors]
    n = sum(sizes)
    first = tensors[0]
    uniform = all(t.dtype == first.dtype and t.device == first.device for t in tensors)
    dtype = first.dtype if uniform else torch.float32
    if orthogonal and k > n:
        raise ValueError(f"orthogonal directions need num_directions <= {n} parameters, got {k}")
    check_distribution(distribution, orthogonal=orthogonal)
    with _drawing():
        if orthogonal:
            flat = _orthogonal_rows(k, n, distribution, generator, first.device).to(dtype)
        else:
            flat = sample((k, n), distribution=distribution, generator=generator, dtype=dtype, device=first.device)
        out = []
        for t, chunk in zip(tensors, flat.split(sizes, dim=1)):
            v = chunk.reshape(k, *t.shape)
            if not uniform:
                v = v.to(dtype=t.dtype, device=t.device)
            out.append(v[0] if num_directions is None else v)
    return out


def _orthogonal_rows(
    k: int, n: int, distribution: str, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """K orthonormal rows of length √N from QR of a K×N draw (sign-fixed, Haar)."""
    raw = sample((n, k), distribution=distribution, generator=generator, dtype=torch.float32, device=device)
    q, r = torch.linalg.qr(raw, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.mul_(math.sqrt(n))


def scale_(vs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """g = w·v for one direction, in each direction's own buffer (it becomes the gradient)."""
    return [v.mul_(weight.reshape(()).to(v.dtype)) for v in vs]


def combine(weights: torch.Tensor, stacked: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σ_k w_k v_k for each tensor's stacked directions ``(K, *shape)``.

    K = 1 is a plain scale (no matmul); K > 1 one ``tensordot`` per tensor.
    """
    if weights.numel() == 1:
        return [v[0] * weights.reshape(()).to(v.dtype) for v in stacked]
    return [torch.tensordot(weights.to(v.dtype), v, dims=1) for v in stacked]


_MASK64 = (1 << 64) - 1


def counter_seed(*counters: int) -> int:
    """A 63-bit seed from integer counters, e.g. ``(step_seed, tensor, chunk)``.

    Counter-based streams (Salmon et al. 2011, "Parallel random numbers: as
    easy as 1, 2, 3"): the draw for a piece of a direction is a pure function
    of its coordinates, so any piece can be regenerated on its own, in any
    order, without storing it or replaying the stream before it. The counters
    are mixed with splitmix64 (Steele, Lea, Flood 2014).
    """
    x = 0
    for c in counters:
        x = (x ^ (int(c) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1
