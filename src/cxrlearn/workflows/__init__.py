"""Multi-step work as library functions, each the body of one command: ``train`` (split, cache, fit,
bundle), ``evaluate`` (judge a bundle, choose thresholds, write the report) and ``reproduce`` (a
publication from download to its table). They sit above every other layer and below serving and the CLI."""

#: Images per batch when evaluating.
EVALUATE_BATCH_SIZE = 64
