"""Keras-Tuner search of the radius rho (and the variant that uses it).

`SAMHyperModel` turns a model-building function into a hypermodel whose
search space is

```
variant       ~ Choice(variants)                   # "sam", "asam", "lets"
rho_<variant> ~ log-uniform(lo_variant, hi_variant) # if variant is chosen
```

and `search_rho` runs a Keras-Tuner search over it. The first trial of every
search is the baseline `rho = 0` (exactly the inner optimizer), so the
results always show what sharpness-aware training buys on the task.

This module imports `keras_tuner`; `import keras_sam` does not, the module
is loaded on first use of `keras_sam.tuning`.
"""

from keras_sam.tuning.hypermodel import SAMHyperModel
from keras_sam.tuning.search import search_rho
from keras_sam.tuning.space import DEFAULT_RHO_RANGES
from keras_sam.tuning.space import LETS
from keras_sam.tuning.space import RHO
from keras_sam.tuning.space import VARIANT
from keras_sam.tuning.space import baseline_trial
from keras_sam.tuning.space import get_rho
from keras_sam.tuning.space import is_baseline
from keras_sam.tuning.space import rho_name

__all__ = [
    "SAMHyperModel",
    "search_rho",
    "DEFAULT_RHO_RANGES",
    "LETS",
    "RHO",
    "VARIANT",
    "baseline_trial",
    "get_rho",
    "is_baseline",
    "rho_name",
]
