#!/usr/bin/env bash
# GRACE lr on the tuning split (ZsRE dev 100-111), as docs/eval.md "Splits" says: one live
# server, one editserve eval run per candidate; compare compute_s_median and Rel./Gen. gen.
set -u
cd "$(dirname "$0")/.."
export EDITSERVE_STATE_DIR=${TMPDIR:-/tmp}/editserve-tune-grace EDITSERVE_STATS_AT_START=false
rm -rf ${TMPDIR:-/tmp}/editserve-tune-grace
.venv/bin/editserve serve --port 8812 > ${TMPDIR:-/tmp}/editserve-tune-grace.log 2>&1 &
SRV=$!
for i in $(seq 60); do curl -sf localhost:8812/health >/dev/null && break; sleep 2; done
Z=../shared/data/knowedit/zsre/ZsRE-test-all.dev.json
for L in 3.0 1.0 2.0 4.0; do
  .venv/bin/editserve eval --server http://127.0.0.1:8812 --method grace --data $Z --split tune --n 12 \
    --hparams "{\"lr\": $L}" --baseline results/tune/grace-baseline --out results/tune/grace-lr-$L --no-progress \
    > ${TMPDIR:-/tmp}/editserve-tune-grace-$L.log 2>&1
  echo "lr $L done $(date)"
done
kill $SRV
