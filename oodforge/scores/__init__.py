"""Post-hoc OOD scores (DESIGN.md §5): higher score = more in-distribution.

Every score is a :class:`Score` object with one interface, so callers never branch on its name::

    score = build_score("vim", dim=64).fit(train_features, train_labels, logits=train_logits,
                                           layer=final_layer(model))  # a no-op for scores without fitting
    values = score(logits, features)                                   # [N] tensor, higher = more ID
    tensors, params = score.state_dict(), score.params()               # -> safetensors / JSON

What a score needs is declared by class attributes (``needs_fit``, ``needs_layer``, ``needs_grad``; see
:mod:`oodforge.scores.base`). The math lives in pure functions, one module per family:

- :mod:`~oodforge.scores.logit`: msp, max_logit, energy, entropy, gen, klm;
- :mod:`~oodforge.scores.feature`: knn, mahalanobis, rmds, she, nnguide (any head);
- :mod:`~oodforge.scores.activation`: react, ash_p, ash_b, ash_s, scale, dice (linear head);
- :mod:`~oodforge.scores.geometry`: vim, fdbd, gradnorm (linear head);
- :mod:`~oodforge.scores.gradient`: odin (input gradients, its own pass).
"""

from oodforge.scores.activation import (
    ash_binarize,
    ash_prune,
    ash_scale,
    dice_weight,
    kept_count,
    react_clip,
    scale_shaping,
)
from oodforge.scores.base import (
    ALL,
    SCORES,
    Score,
    build_score,
    check_score_params,
    default_scores,
    score_parameters,
)
from oodforge.scores.feature import (
    class_means_and_tied_covariance,
    hopfield_energy,
    mahalanobis_distances,
    nn_guidance,
    relative_mahalanobis,
)
from oodforge.scores.geometry import fdbd, gradnorm, residual_basis, vim, vim_origin, weight_distances
from oodforge.scores.gradient import odin
from oodforge.scores.logit import energy, entropy, generalized_entropy, kl_matching, max_logit, msp

__all__ = [
    "ALL",
    "SCORES",
    "Score",
    "ash_binarize",
    "ash_prune",
    "ash_scale",
    "build_score",
    "check_score_params",
    "class_means_and_tied_covariance",
    "default_scores",
    "dice_weight",
    "energy",
    "entropy",
    "fdbd",
    "generalized_entropy",
    "gradnorm",
    "hopfield_energy",
    "kept_count",
    "kl_matching",
    "mahalanobis_distances",
    "max_logit",
    "msp",
    "nn_guidance",
    "odin",
    "react_clip",
    "relative_mahalanobis",
    "residual_basis",
    "scale_shaping",
    "score_parameters",
    "vim",
    "vim_origin",
    "weight_distances",
]
