#!/usr/bin/env bash
# The small-data recipe's comparisons on the NIH sample (docs/benchmarks.md, "The small-data recipe chosen by
# paired comparison"): each candidate trained on one split, then judged against the others on the same test
# images with `cxrlearn compare`. About 10 minutes of a 2-core CPU per fine-tuned run.
#
#   bash benchmarks/recipe_sample.sh OUT
set -euo pipefail
OUT=${1:?usage: recipe_sample.sh OUT}
IMAGES=${IMAGES:-../shared/data/nih-sample/images-256}
run() { cxrlearn "$@" --no-progress; }

# The preset as it is (training seed 2137); its split serves every other candidate.
run train --config cpu-sample --out "$OUT/base"
SPLIT=$OUT/base/split.csv
# The baseline to beat: logistic regression on frozen ImageNet features of the same backbone and images.
run linear-probe --config cpu-sample --split "$SPLIT" --out "$OUT/probe"
# Candidates.
run train --config cpu-sample --split "$SPLIT" --set optim.scheduler=cosine --set optim.warmup_epochs=1 --out "$OUT/cosine"
run train --config cpu-sample --split "$SPLIT" --set train.ema_decay=0.98 --out "$OUT/ema"
run train --config cpu-sample --split "$SPLIT" --set model.trainable_blocks=1 --out "$OUT/blocks1"
run train --config cpu-sample --split "$SPLIT" --set model.trainable_blocks=null --set optim.layer_decay=0.7 \
    --out "$OUT/llrd"
run train --config cpu-sample --split "$SPLIT" --seeds 2 --set train.seed=2138 --out "$OUT/seeds"
run ensemble "$OUT/base" "$OUT/probe" --out "$OUT/ens-base-probe"
run ensemble "$OUT/base" "$OUT/seeds" --out "$OUT/ens-3seeds"
run ensemble "$OUT/base" "$OUT/seeds" "$OUT/probe" --out "$OUT/ens-3seeds-probe"
run ensemble "$OUT/base" "$OUT/seeds" "$OUT/ema" "$OUT/probe" --out "$OUT/ens-5"
# The comparisons: every later model against every earlier one, on the split's test images.
run compare "$OUT/probe" "$OUT/base" "$OUT/cosine" "$OUT/ens-base-probe" --images "$IMAGES" --subset test --out "$OUT/compare-1"
run compare "$OUT/probe" "$OUT/base" "$OUT/seeds" "$OUT/ens-3seeds" "$OUT/ens-3seeds-probe" --images "$IMAGES" \
    --subset test --out "$OUT/compare-2"
run compare "$OUT/probe" "$OUT/base" "$OUT/ema" --images "$IMAGES" --subset test --out "$OUT/compare-3"
run compare "$OUT/probe" "$OUT/base" "$OUT/blocks1" "$OUT/llrd" "$OUT/ens-5" --images "$IMAGES" --subset test \
    --out "$OUT/compare-4"
