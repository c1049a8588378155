#!/bin/bash
# Validation-only re-check of the smollm2 search's top candidates under fresh fine-tuning seeds.
# The *.config.json files are the configurations of bench/results/smollm2/result.json's evaluations.
cd "$(dirname "$0")/../../.."  # the repository root
for seed in 1 2; do for n in winner runner-up uniform-4bit-r16; do
  .venv/bin/autoqra evaluate --model smollm2-135m --config bench/results/smollm2-recheck/$n.config.json --fidelity -1 --seed $seed \
     --search-config bench/smollm2.yaml > bench/results/smollm2-recheck/$n.seed$seed.json 2> bench/results/smollm2-recheck/$n.seed$seed.err
  echo "$n seed $seed rc=$?"
done; done
