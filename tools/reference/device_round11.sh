#!/bin/bash
# Device, eleventh round (2026-12-07): issue 19's HTTP benchmark again, now
# that .carry/serve-debs carries lua-lpeg and lua-filesystem for nginx's
# LuaJIT (round 7's server answered 500: "module 'lpeg' not found"): HTTP
# at 1, 8, 32 and 64 streams, the seeds' study over HTTP (30 s), and the
# same load in process. Carry .device-kit and .carry.
set -u
SERVE_TIMEOUT=${SERVE_TIMEOUT:-150} STAGES=serve bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -25
grep -aE "\[(error|crit|alert|emerg)\]" $OUT/nginx_error.log 2>/dev/null | cut -c1-300 | sort | uniq -c | sort -rn | head -5
cp $OUT/nginx_error.log $OUT/nginx_error_serve.log 2>/dev/null
STUDY_S=30 STUDY_TIMEOUT=${STUDY_TIMEOUT:-90} STAGES=study bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -40
INPROCESS_TIMEOUT=${INPROCESS_TIMEOUT:-100} STAGES=inprocess bash tools/reference/device_serve.sh 2>&1 | grep -v "^|---" | tail -12
