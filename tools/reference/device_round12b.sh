#!/bin/bash
# Device, twelfth round, second part (the warm machine of device_round12.sh,
# its /tmp/gptoss-20b kept): the seeds' study over HTTP (30 s) and the same
# load in process. Carry .device-kit and .carry.
set -u
T0=$(date +%s)
STUDY_S=30 STUDY_TIMEOUT=${STUDY_TIMEOUT:-150} STAGES=study bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -40
INPROCESS_TIMEOUT=${INPROCESS_TIMEOUT:-200} STAGES=inprocess bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -12
grep -aE "\[(error|crit|alert|emerg)\]" $OUT/nginx_error.log 2>/dev/null | cut -c1-300 | sort | uniq -c | sort -rn | head -5
echo "done at $(( $(date +%s) - T0 )) s"
