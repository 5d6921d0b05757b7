"""Fit the fast tanh of the effgen backend (templates/effgen/activations.c.j2):

    tanh(x) ~ x * P(x^2) / Q(x^2),  P of degree 4, Q of degree 4 with Q(0) = 1,

for the smallest maximum absolute error on [0, 9] (x is clamped to [-9, 9], where
1 - tanh(9) < 3e-8; the fit is odd, so [-9, 0] follows). Method: Loeb's linearised
least squares (x P - tanh(x) Q = tanh(x), each row divided by the previous Q) to a
starting point, then Lawson's reweighting (weights times the current absolute
error) towards the minimax; a fixed number of steps on a fixed grid, so the output is
reproducible. Coefficients are rounded to float, as the C evaluates them.

`python -m effgen.codegen.fit_tanh` prints the two C lines of the template; a test
checks that the template holds exactly these constants.
"""

import numpy as np

X_MAX = 9.0
N_GRID = 3000
LOEB_STEPS = 30
LAWSON_STEPS = 300
_SCALE = X_MAX * X_MAX  # powers of t / 81 keep the least-squares columns comparable


def _grid():
    x = np.linspace(0.0, X_MAX, N_GRID + 1)[1:]
    return x, x * x, np.tanh(x)


def _solve(x, t, y, weights, q_prev):
    cols = [x * (t / _SCALE) ** k for k in range(5)] + [-y * (t / _SCALE) ** k for k in range(1, 5)]
    a = np.column_stack(cols) / q_prev[:, None]
    b = y / q_prev
    sw = np.sqrt(weights)
    sol, *_ = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)
    scale = _SCALE ** -np.arange(5.0)
    return sol[:5] * scale, np.concatenate([[1.0], sol[5:] * scale[1:]])


def evaluate(p, q, x):
    """x * P(x^2) / Q(x^2) in double, coefficients lowest degree first."""
    t = np.asarray(x, np.float64) ** 2
    return x * np.polyval(np.asarray(p, np.float64)[::-1], t) / np.polyval(np.asarray(q, np.float64)[::-1], t)


def fit():
    """(p, q): float32 coefficients, lowest degree first (q[0] == 1)."""
    x, t, y = _grid()
    weights, q_prev = np.ones_like(x), np.ones_like(x)
    for _ in range(LOEB_STEPS):
        p, q = _solve(x, t, y, weights, q_prev)
        q_prev = np.polyval(q[::-1], t)
    for _ in range(LAWSON_STEPS):
        p, q = _solve(x, t, y, weights, q_prev)
        q_prev = np.polyval(q[::-1], t)
        weights = weights * np.abs(evaluate(p, q, x) - y)
        weights /= weights.max()
    return p.astype(np.float32), q.astype(np.float32)


def c_float(v) -> str:
    """A float32 as the shortest C literal that reads back to the same float."""
    v = np.float32(v)
    if v == 1:
        return "1.0f"
    for digits in range(6, 10):
        s = "%.*e" % (digits - 1, float(v))
        if np.float32(float(s)) == v:
            return s + "f"
    raise AssertionError(v)


def horner(coefficients, var="t") -> str:
    """C Horner form of sum c[k] var^k, highest degree innermost."""
    c = [c_float(v) for v in coefficients]
    text = c[-1]
    for k in range(len(c) - 2, -1, -1):
        text = f"({text} * {var} + {c[k]})" if k else f"{text} * {var} + {c[k]}"
    return text


def c_lines(p, q) -> list:
    """The template's two lines computing P(t) and Q(t)."""
    return [f"p = {horner(p)};", f"q = {horner(q)};"]


def main():
    p, q = fit()
    x = np.linspace(0.0, X_MAX, 200001)
    err = np.abs(evaluate(p, q, x) - np.tanh(x)).max()
    print(f"/* max |x P(t) / Q(t) - tanh(x)| on [0, {X_MAX:g}] in double: {err:.3g} */")
    for line in c_lines(p, q):
        print(line)


if __name__ == "__main__":
    main()
