"""Multi-stage experiments behind `align repro`: each a library function that trains, evaluates and reports, every
stage resumable (`align.pipeline`). `runs` holds what they share (the configuration record of a run directory);
`pass_k` is the pass@k proving ground (`align repro pass-k`), `pass_k_report` its table, claims and figure; `dco`
is cross-entropy vs DCO over epochs by exact coverage (`align repro dco`), `dco_report` its comparisons and claims.
"""
