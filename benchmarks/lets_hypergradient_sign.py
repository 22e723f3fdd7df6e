"""How often the LETS hypergradient approximations have the sign of dF/drho.

The one-step objective of LETS is `F(rho) = 1/2 (L_val(w_1) - L_train(w_1))^2`
with `w_1 = w - lr grad L(w + rho g/||g||)` (SAM with plain SGD). Its true
derivative is taken by central differences; the library's approximations
replace `dw_1/drho = -lr H(w + eps) g/||g||` by

- "secant":   `-lr (g_adv - g) / rho`,
- "diagonal": `-lr g_adv * g_adv * g/||g||` (the paper's diagonal Hessian).

Along a SAM run (digits with 20% label noise, a 64-64-10 tanh MLP, batch
32, lr 0.1, float64) every 15th step compares the signs on that step's
training and validation batches. Written with JAX directly (float64 and
exact gradients); prints one line per rho.

    JAX_PLATFORMS=cpu python benchmarks/lets_hypergradient_sign.py
    JAX_PLATFORMS=cpu python benchmarks/lets_hypergradient_sign.py --rho 0.05
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

jax.config.update("jax_enable_x64", True)


def data(seed):
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < 0.2
    y = np.where(flip, (y + rng.integers(1, 10, len(y))) % 10, y)
    order = rng.permutation(len(x))
    val, train = order[:200], order[200:]
    return (x[train], y[train]), (x[val], y[val]), rng


def loss(p, x, y):
    h = jnp.tanh(x @ p[0] + p[1])
    z = h @ p[2] + p[3]
    return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])


grad = jax.jit(jax.grad(loss))
value = jax.jit(loss)


def flat(ps):
    return jnp.concatenate([q.ravel() for q in ps])


def sam_step(p, x, y, rho, lr):
    g = grad(p, x, y)
    norm = jnp.sqrt(sum(jnp.sum(q**2) for q in g))
    g_adv = grad([a + rho * b / norm for a, b in zip(p, g)], x, y)
    return [a - lr * b for a, b in zip(p, g_adv)], g, g_adv, norm


def objective(p, x, y, xv, yv, rho, lr):
    w1 = sam_step(p, x, y, rho, lr)[0]
    return 0.5 * (value(w1, xv, yv) - value(w1, x, y)) ** 2


def agreement(rho, lr, steps, seed):
    (xt, yt), (xv, yv), rng = data(seed)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    p = [
        0.2 * jax.random.normal(k1, (64, 64)),
        jnp.zeros(64),
        0.2 * jax.random.normal(k2, (64, 10)),
        jnp.zeros(10),
    ]
    agree = {"secant": [], "diagonal": []}
    for t in range(steps):
        i = rng.integers(0, len(xt), 32)
        j = rng.integers(0, len(xv), 32)
        x, y, xvb, yvb = xt[i], yt[i], xv[j], yv[j]
        if t % 15 == 0:
            h = 1e-4 * rho
            exact = (
                objective(p, x, y, xvb, yvb, rho + h, lr)
                - objective(p, x, y, xvb, yvb, rho - h, lr)
            ) / (2 * h)
            w1, g, g_adv, norm = sam_step(p, x, y, rho, lr)
            gap = value(w1, xvb, yvb) - value(w1, x, y)
            dv = flat(grad(w1, xvb, yvb)) - flat(grad(w1, x, y))
            dw = {
                "secant": -lr * (flat(g_adv) - flat(g)) / rho,
                "diagonal": -lr * flat(g_adv) ** 2 * flat(g) / norm,
            }
            if abs(exact) > 1e-14:
                for name, d in dw.items():
                    agree[name].append(np.sign(gap * dv @ d) == np.sign(exact))
        p = sam_step(p, x, y, rho, lr)[0]
    return {k: float(np.mean(v)) for k, v in agree.items()}, len(
        agree["secant"]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", default="0.05,0.5,2.0")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for rho in (float(r) for r in args.rho.split(",")):
        rates, n = agreement(rho, args.lr, args.steps, args.seed)
        print(
            f"rho {rho:g}: sign of dF/drho matched by secant "
            f"{100 * rates['secant']:.0f}%, diagonal "
            f"{100 * rates['diagonal']:.0f}% of {n} checks"
        )


if __name__ == "__main__":
    main()
