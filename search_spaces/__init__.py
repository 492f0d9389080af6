"""Declarative hyper-parameter search spaces, validated against the config's own field ranges.

A space is a YAML mapping (the shipped ones live next to this file, users pass a path)::

    name: my_space
    description: why these ranges
    method: bam                      # optional: the method whose options the space tunes
    params:
      method.reg: {type: loguniform, low: 0.01, high: 0.3}
      method.num_sink_iter: {type: choice, values: [1, 2, 3, 5, 10]}
      method.top_k_sink: {type: choice, values: [0, 32, 64, 128], clip: bam_targets}

Keys are dotted config fields (the same keys ``--set`` takes). Types: ``uniform`` and ``loguniform``
(float ``low``/``high``), ``randint`` (integers ``low``..``high``, both INCLUDED, unlike
``tune.randint``), ``choice`` (``values``, sampled) and ``grid`` (``values``, every value is run).

Why validate here: a sweep launches many Ray jobs, and a range endpoint outside a field's declared
range would only surface as errored trials minutes later. :func:`load_space` runs the check it is handed
(the orchestrator builds the experiment config through ``config_from_dict``) once per range endpoint /
choice value, so the field's own ``opt()`` range and the cross-field rules (each option section's
``check``) decide, and raises ``ConfigError`` naming the space parameter and the allowed range before
anything starts. The check is handed in rather than imported: this package sits below the orchestrator.

``clip`` names a rule whose limit depends on the run (e.g. ``bam_targets``: BAM's ``top_k_sink``
must not exceed ``num_target_crops x batch_size x workers``, the targets in the global batch): the
values above the limit are lowered to it. It is applied at load time against the base config and
again per trial, in case the space also samples the batch size.
"""

from search_spaces.parse import SPACES_DIR, available_spaces, read_space, space_from_dict
from search_spaces.space import CLIP_RULES, DISCRETE_TYPES, PARAM_TYPES, SearchSpace, SpaceParam
from search_spaces.validate import ConfigCheck, load_space, validate_space

__all__ = [
    "CLIP_RULES",
    "DISCRETE_TYPES",
    "PARAM_TYPES",
    "SPACES_DIR",
    "ConfigCheck",
    "SearchSpace",
    "SpaceParam",
    "available_spaces",
    "load_space",
    "read_space",
    "space_from_dict",
    "validate_space",
]
