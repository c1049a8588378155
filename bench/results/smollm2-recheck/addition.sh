#!/bin/bash
# Validation-only: the WordNet search's winner and runner-up (mixed, within the uniform-4bit-r16 budget) on addition.
cd "$(dirname "$0")/../../.."
D=bench/results/smollm2-recheck
for seed in 0 1; do for n in winner runner-up; do
  .venv/bin/autoqra evaluate --model smollm2-135m --dataset addition --config $D/$n.config.json --fidelity -1 \
     --seed $seed --search-config bench/smollm2.yaml > $D/addition-$n.seed$seed.json 2> /tmp/probe-$n-$seed.err
  echo "$n seed $seed rc=$?"
done; done
