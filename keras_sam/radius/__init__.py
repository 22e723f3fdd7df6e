"""Learned perturbation radius (LETS): rho learned by a hypergradient.

- `learned`: `LearnedRadius`, the state and the hooks the step calls;
- `hypergradient`: the math (dw/drho, dF/drho for each objective, the rho
  step), as functions of tensors.
"""

from keras_sam.radius.learned import LearnedRadius

__all__ = ["LearnedRadius"]
