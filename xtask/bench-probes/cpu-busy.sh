#!/bin/bash
# Run beside `cargo xtask bench`: how busy both CPUs are (from /proc/stat)
# during each ApacheBench run and during the UDP load that follows it.
sample() {
  read -r _ u1 n1 s1 i1 w1 q1 sq1 _ </proc/stat; sleep 3
  read -r _ u2 n2 s2 i2 w2 q2 sq2 _ </proc/stat
  t=$(((u2 - u1) + (n2 - n1) + (s2 - s1) + (i2 - i1) + (w2 - w1) + (q2 - q1) + (sq2 - sq1)))
  echo "$1: $((100 - (i2 - i1) * 100 / t))% busy"
}
n=0
while [ $n -lt "${1:-2}" ]; do
  if pid=$(pgrep -x ab | head -1); then
    n=$((n + 1)); sleep 1; sample "ab $n"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    sleep 1; sample "udp $n"
  fi
  sleep 0.1
done
